"""Hyper-parameter tuning of a quality head by k-fold cross-validation inside the training part.

The score is the routed quality (mean score of the argmax-predicted model) on each validation
fold, averaged over folds. Rows are unique prompts (the wide matrix), so folds never share one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from router_ml.evaluation.metrics import routed_scores

log = logging.getLogger(__name__)


def param_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of a {param: [values]} grid (a list value of lists stays a value)."""
    keys = sorted(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def cv_quality(
    name: str,
    params: Mapping[str, Any],
    X: np.ndarray,
    Y: np.ndarray,
    task_ids: np.ndarray | None,
    folds: int = 3,
    seed: int = 0,
) -> float:
    """Mean routed quality over ``folds`` seeded folds for one parameter setting."""
    from sklearn.model_selection import KFold

    from router_ml.predictors import build_quality_predictor

    scores = []
    for tr, va in KFold(n_splits=folds, shuffle=True, random_state=seed).split(X):
        head = build_quality_predictor(name, **params).fit(
            X[tr], Y[tr], None if task_ids is None else task_ids[tr]
        )
        scores.append(float(np.mean(routed_scores(head.predict(X[va]), Y[va]))))
    return float(np.mean(scores))


def tune_quality_head(
    name: str,
    base_params: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    X: np.ndarray,
    Y: np.ndarray,
    task_ids: np.ndarray | None,
    folds: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], float]:
    """Grid search: returns the best ``base_params`` updated with the winning grid values, and its CV score."""
    from tqdm.auto import tqdm

    best_params, best_score = dict(base_params), -np.inf
    candidates = param_grid(grid)
    for combo in tqdm(candidates, desc=f"tune {name}", disable=not progress or len(candidates) < 2):
        params = {**base_params, **combo}
        score = cv_quality(name, params, X, Y, task_ids, folds=folds, seed=seed)
        log.info("tune %s %s: cv quality %.4f", name, combo, score)
        if score > best_score:
            best_params, best_score = params, score
    return best_params, float(best_score)
