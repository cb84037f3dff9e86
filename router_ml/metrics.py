"""Routing-quality metrics on a score matrix (definitions as in the project's peers notes).

All functions take ``Y``: (n_prompts, n_models) observed scores in [0, 1] (NaN = no outcome)
and, where relevant, ``pred``: predicted quality of the same shape.

- Quality of a router = mean score of the model it picked per prompt. A model with no outcome
  for a prompt cannot be scored, so routing picks among the models observed for that prompt.
- Oracle: per prompt, the best observed score (an upper bound).
- Best single model: the model with the highest mean score, CHOSEN ON TRAINING DATA and then
  scored on the evaluation prompts (choosing it on the test set would flatter the baseline).
- Random: the expected score of a uniform random pick (mean of each row's observed scores).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def routed_choice(pred: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray:
    """(n,) index of the argmax of ``pred`` per row, among models observed in ``Y`` when given."""
    p = np.asarray(pred, dtype="float64").copy()
    if Y is not None:
        p[np.isnan(Y)] = -np.inf
    return np.argmax(p, axis=1)


def routed_scores(pred: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """(n,) score of the argmax-predicted model per prompt."""
    idx = routed_choice(pred, Y)
    return Y[np.arange(len(Y)), idx]


def oracle_scores(Y: np.ndarray) -> np.ndarray:
    return np.nanmax(Y, axis=1)


def random_scores(Y: np.ndarray) -> np.ndarray:
    return np.nanmean(Y, axis=1)


def best_single_model(Y_train: np.ndarray) -> int:
    """Index of the model with the highest mean training score (NaN-aware)."""
    return int(np.nanargmax(np.nanmean(Y_train, axis=0)))


def gap_closed(quality: float, best_single: float, oracle: float) -> float:
    """Share of the best-single-to-oracle gap a router closes: (q - best) / (oracle - best)."""
    gap = oracle - best_single
    return float("nan") if gap <= 0 else float((quality - best_single) / gap)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over prompts with a (1 - alpha) paired-bootstrap percentile CI.

    ``a`` and ``b`` are per-prompt scores of two routers on the same prompts; resampling prompts
    (not routers) keeps the pairing. Returns ``(mean_diff, lo, hi)``.
    """
    a = np.asarray(a, dtype="float64")
    b = np.asarray(b, dtype="float64")
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal shapes, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(d.mean()), float(lo), float(hi)


def json_safe(obj: Any) -> Any:
    """Strict JSON: NaN/inf -> null, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
