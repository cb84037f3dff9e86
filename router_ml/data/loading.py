"""Build the routing table a run trains on, from its data config.

``cfg`` keys: ``adapter`` (a name in :data:`router_ml.data.adapters.ADAPTERS`, or ``simulated``
for the project's own labelled prompts with simulated outcomes), ``options`` (keyword arguments
for the adapter), ``max_prompts`` (seeded, task-stratified subsample; ``null`` = all),
``models`` (keep only these models; ``null`` = all), ``sources`` (for ``simulated``: which
labelled sets feed it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from router_ml.data.schema import validate_table


def subsample_prompts(table: pd.DataFrame, max_prompts: int, seed: int = 0) -> pd.DataFrame:
    """Keep ``max_prompts`` prompt ids, drawn per task in proportion to its share (seeded)."""
    prompts = table.drop_duplicates("prompt_id")[["prompt_id", "task"]]
    if len(prompts) <= max_prompts:
        return table
    rng = np.random.default_rng(seed)
    keep: list[str] = []
    frac = max_prompts / len(prompts)
    for _, grp in prompts.groupby("task", sort=True):
        n = max(1, round(len(grp) * frac))
        keep.extend(rng.choice(grp["prompt_id"].to_numpy(), size=min(n, len(grp)), replace=False).tolist())
    return table[table["prompt_id"].isin(set(keep))].reset_index(drop=True)


def load_routing_data(cfg: Mapping[str, Any], seed: int = 0) -> pd.DataFrame:
    """The validated routing table described by a data config (see module docstring)."""
    adapter = cfg.get("adapter")
    if not adapter:
        raise ValueError("data config needs an 'adapter' (e.g. llmrouter, routerbench, simulated)")
    options = dict(cfg.get("options") or {})
    if adapter == "simulated":
        from router_ml.data.labelled import load_labelled
        from router_ml.data.simulate import simulate_outcomes

        sources = list(cfg.get("sources") or ["project"])
        prompts = pd.concat([load_labelled(s) for s in sources], ignore_index=True)
        table = simulate_outcomes(prompts, **options)
    else:
        from router_ml.data.adapters import load_source

        table = load_source(adapter, **options)
    models = cfg.get("models")
    if models:
        unknown = sorted(set(models) - set(table["model"]))
        if unknown:
            raise ValueError(f"data config 'models' names model(s) {unknown} absent from {adapter!r}")
        table = table[table["model"].isin(set(models))].reset_index(drop=True)
    max_prompts = cfg.get("max_prompts")
    if max_prompts:
        table = subsample_prompts(table, int(max_prompts), seed=seed)
    return validate_table(table, name=f"data {adapter!r}")
