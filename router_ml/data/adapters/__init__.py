"""One adapter per routing data set, each returning a validated long routing table.

``load_source("llmrouter")`` (or any key of :data:`ADAPTERS`) loads a source from
``$ROUTER_ML_DATA_DIR/<folder>``; keyword arguments go to the adapter (``path=...`` reads
another copy). Mapping decisions per source are documented in ``router_ml/data/README.md``.
``collected`` is the user's own collection store (``load_source("collected", path=...)``): it has
no data-set folder, so it is in :data:`ADAPTERS` but not in :data:`SOURCE_FOLDERS`.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from router_ml.data.adapters.alpaca_eval import load_alpaca_eval
from router_ml.data.adapters.collected import load_collected
from router_ml.data.adapters.llmrouter import MalformedRecordError, load_llmrouter
from router_ml.data.adapters.mmlu_pro import load_mmlu_pro
from router_ml.data.adapters.routellm import load_routellm
from router_ml.data.adapters.routerbench import load_routerbench
from router_ml.data.adapters.routerdc import load_routerdc
from router_ml.data.adapters.zeroeval import load_zeroeval

ADAPTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "llmrouter": load_llmrouter,
    "routerbench": load_routerbench,
    "routellm": load_routellm,
    "routerdc": load_routerdc,
    "mmlu_pro": load_mmlu_pro,
    "zeroeval": load_zeroeval,
    "alpaca_eval": load_alpaca_eval,
    "collected": load_collected,
}

# short name -> data set folder under $ROUTER_ML_DATA_DIR (= the ``source`` column)
SOURCE_FOLDERS: dict[str, str] = {
    "llmrouter": "llmrouter_ulab",
    "routerbench": "routerbench_subset_routerdc",
    "routellm": "routellm_gpt4_mixtral",
    "routerdc": "routerdc_7models",
    "mmlu_pro": "mmlu_pro_model_outputs",
    "zeroeval": "zeroeval_math_code",
    "alpaca_eval": "alpaca_eval_annotations",
}


def load_source(name: str, **kwargs: object) -> pd.DataFrame:
    """Load one data set by short name; ``kwargs`` are the adapter's options."""
    if name not in ADAPTERS:
        raise KeyError(f"unknown data source {name!r}; known sources: {sorted(ADAPTERS)}")
    return ADAPTERS[name](**kwargs)


__all__ = [
    "ADAPTERS",
    "SOURCE_FOLDERS",
    "MalformedRecordError",
    "load_alpaca_eval",
    "load_collected",
    "load_llmrouter",
    "load_mmlu_pro",
    "load_routellm",
    "load_routerbench",
    "load_routerdc",
    "load_source",
    "load_zeroeval",
]
