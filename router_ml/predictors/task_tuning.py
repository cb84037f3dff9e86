"""Choosing the task head's settings by cross-validated macro-F1 inside the training part.

Held-out prompts are never seen here: the caller passes only its training rows. ``eval_mask``
marks the rows the score is about (e.g. the project's own labelled prompts); rows outside it
(e.g. benchmark prompts) are always in the training folds and never scored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from router_ml.data.taxonomy import TASK_TYPES
from router_ml.predictors.base import param_grid

log = logging.getLogger(__name__)


def cv_task_macro_f1(
    params: Mapping[str, Any],
    X: np.ndarray,
    y: Sequence[str],
    texts: Sequence[str],
    eval_mask: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    labels: Sequence[str] = TASK_TYPES,
) -> float:
    """Out-of-fold macro-F1 of a :class:`TaskClassifier` with ``params`` on rows ``eval_mask``.

    ``X (n, d)`` embeddings, ``y (n,)`` labels, ``texts (n,)`` prompts. Folds are stratified and
    seeded over the ``eval_mask`` rows; each fold model is fitted without temperature scaling
    (a temperature does not change the argmax), which keeps tuning fast.
    """
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold

    from router_ml.predictors.task import TaskClassifier

    y = np.asarray(list(y), dtype=object)
    texts = list(texts)
    n = len(y)
    if X.shape[0] != n or len(texts) != n:
        raise ValueError(f"cv_task_macro_f1: {X.shape[0]} rows in X, {n} labels, {len(texts)} texts")
    mask = np.ones(n, dtype=bool) if eval_mask is None else np.asarray(eval_mask, dtype=bool)
    scored, always = np.flatnonzero(mask), np.flatnonzero(~mask)
    pred = np.empty(len(scored), dtype=object)
    split = StratifiedKFold(int(folds), shuffle=True, random_state=int(seed))
    for tr, va in split.split(scored, y[scored]):
        rows = np.concatenate([always, scored[tr]])
        clf = TaskClassifier(labels=labels, **{**params, "calibrate": False})
        clf.fit(X[rows], list(y[rows]), texts=[texts[i] for i in rows])
        pred[va] = clf.predict(X[scored[va]], texts=[texts[i] for i in scored[va]])
    return float(f1_score(list(y[scored]), list(pred), average="macro"))


def tune_task_head(
    base_params: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    X: np.ndarray,
    y: Sequence[str],
    texts: Sequence[str],
    eval_mask: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
) -> tuple[dict[str, Any], float, list[tuple[dict[str, Any], float]]]:
    """Grid search by :func:`cv_task_macro_f1`: ``(best params, its CV macro-F1, every (params, f1))``.

    ``base_params`` are the fixed :class:`TaskClassifier` params, ``grid`` ``{param: [values]}``
    the ones searched; ties go to the first setting in grid order.
    """

    results = []
    for point in param_grid(grid):
        params = {**base_params, **point}
        f1 = cv_task_macro_f1(params, X, y, texts, eval_mask, folds, seed)
        log.info("task head %s: CV macro-F1 %.4f", point, f1)
        results.append((params, f1))
    best, best_f1 = max(results, key=lambda r: r[1])
    return dict(best), best_f1, results
