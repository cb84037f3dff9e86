"""What the policies see in an evaluation: the model pool, the decision layer (cost and latency
models) and per-split estimates with the calls' actual cost and latency."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from router_ml.data.schema import wide_column
from router_ml.decision.base import Estimates
from router_ml.training import FittedRouter


def build_pool(cfg: Mapping[str, Any], models: list[str]) -> Any:
    """The decision layer's model pool: ``simulated`` (the seed article's pool), ``auto`` (list
    prices and llmperf latency priors for the data's models) or an explicit list of specs."""
    from router_ml.decision.spec import ModelPool

    default = "simulated" if cfg["data"].get("adapter") == "simulated" else "auto"
    pool_cfg = cfg.get("pool") or cfg["data"].get("pool") or default
    if isinstance(pool_cfg, str):
        pool_cfg = {"type": pool_cfg}
    kind = pool_cfg.get("type", "auto")
    if kind == "simulated":
        return ModelPool.simulated().subset(models)
    if kind == "auto":
        return ModelPool.from_data(models, overrides=pool_cfg.get("overrides"))
    if kind == "config":
        return ModelPool.from_config(pool_cfg["models"]).subset(models)
    raise ValueError(f"pool type must be simulated, auto or config, got {kind!r}")


@functools.lru_cache(maxsize=4)
def _learned_output_lengths(data_root: str) -> Any:
    """The output-length model fitted on the data sets under ``data_root`` (read once per process:
    every seed and every row of a results run shares it)."""
    from router_ml.decision.costs import OutputLengthModel

    return OutputLengthModel.from_datasets(data_root)


def build_layer(cfg: Mapping[str, Any], models: list[str]) -> Any:
    from router_ml.decision.costs import CostModel, OutputLengthModel
    from router_ml.decision.latency import LatencyModel
    from router_ml.decision.layer import DecisionLayer
    from router_ml.decision.policies import UtilityPolicy
    from router_ml.paths import data_dir

    pool = build_pool(cfg, models)
    out_cfg = cfg.get("output_lengths", "datasets")
    output_model = _learned_output_lengths(str(data_dir())) if out_cfg == "datasets" else OutputLengthModel()
    return DecisionLayer(UtilityPolicy(), pool, CostModel(pool, output_model), LatencyModel(pool))


def split_estimates(
    layer: Any,
    fitted: FittedRouter,
    split: str,
    quality: np.ndarray,
    tasks: list[str],
    table_split: pd.DataFrame,
) -> tuple[Estimates, np.ndarray, np.ndarray]:
    """(estimates, actual cost (n, m), actual latency (n, m)) for one split's prompts."""
    prompts, Y, models = fitted.wide[split]
    return prompt_estimates(layer, prompts, Y, models, quality, tasks, table_split)


def prompt_estimates(
    layer: Any,
    prompts: pd.DataFrame,
    Y: np.ndarray,
    models: list[str],
    quality: np.ndarray,
    tasks: list[str],
    table_split: pd.DataFrame,
) -> tuple[Estimates, np.ndarray, np.ndarray]:
    """(estimates, actual cost (n, m), actual latency (n, m)) for the ``prompts`` of
    :func:`~router_ml.data.schema.to_wide` (``Y`` (n, m) their observed scores) drawn from the long
    ``table_split``; ``quality`` (n, m) is what the policy sees, ``tasks`` (n,) the predicted types."""
    est = layer.estimates(prompts["prompt"].tolist(), quality, models, tasks, observed=Y)
    est.feasible = ~np.isnan(Y)
    cost = wide_column(table_split, prompts, models, "cost_usd")
    if np.isnan(cost[est.feasible]).any():
        raise ValueError(
            f"{int(np.isnan(cost[est.feasible]).sum())} observed calls have no cost "
            "(a model without a price); give the pool prices or drop the model"
        )
    out_tokens = wide_column(table_split, prompts, models, "output_tokens")
    missing = np.isnan(out_tokens)
    if missing.any():  # no measured length: the output-length model's expectation (no re-tokenising)
        expected = layer.cost_model.output_model.predict(models, tasks)
        cap = np.array([layer.pool.get(m).max_tokens or np.inf for m in models], dtype="float64")
        expected = np.minimum(expected, cap)
        out_tokens = np.where(missing, expected, out_tokens)
    if "latency_s" in table_split and table_split["latency_s"].notna().all():
        latency = wide_column(table_split, prompts, models, "latency_s")
    else:
        latency = layer.latency_model.expected(out_tokens)[1]
    return est, cost, latency
