"""Hyper-parameter tuning of a quality head by k-fold cross-validation inside the training part.

The score is the routed quality (mean score of the argmax-predicted model) on each validation
fold, averaged over folds. Rows are unique prompts (the wide matrix), so folds never share one.
Heads that read the prompt text (``uses_text``) get the matching ``texts`` in fit and predict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from router_ml.metrics import routed_scores
from router_ml.predictors.base import param_grid

log = logging.getLogger(__name__)

#: a non-router reference: ``f(prompts_train, Y_train (n, m), prompts_test, Y_test (k, m)) -> (k,)``
Reference = Callable[[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray], np.ndarray]


def fit_head(
    name: str,
    params: Mapping[str, Any],
    X: np.ndarray,
    Y: np.ndarray,
    task_ids: np.ndarray | None,
    texts: Sequence[str] | None = None,
) -> Any:
    """A quality head built from its registry key and params, fitted on ``X (n, d)``, ``Y (n, m)``
    (and ``texts``, the n prompts, when the head reads text)."""
    from router_ml.predictors import build_quality_predictor

    head = build_quality_predictor(name, **params)
    if head.uses_text:
        return head.fit(X, Y, task_ids, texts=texts)
    return head.fit(X, Y, task_ids)


def head_layers(hcfg: Mapping[str, Any]) -> list[int]:
    """The encoder layers a head config ``{name, params}`` reads beside the embedding
    (:attr:`~router_ml.predictors.base.QualityPredictor.layers`; ``[]`` for most heads)."""
    from router_ml.predictors import build_quality_predictor

    return [int(k) for k in build_quality_predictor(hcfg["name"], **dict(hcfg.get("params") or {})).layers]


def predict_head(head: Any, X: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
    """``head.predict`` on ``X (n, d)``, with the ``texts`` when the head reads text; ``(n, m)``."""
    if head.uses_text:
        return head.predict(X, texts=texts)
    return head.predict(X)


def cv_quality(
    name: str,
    params: Mapping[str, Any],
    X: np.ndarray,
    Y: np.ndarray,
    task_ids: np.ndarray | None,
    folds: int = 3,
    seed: int = 0,
    texts: Sequence[str] | None = None,
) -> float:
    """Mean routed quality over ``folds`` seeded folds for one parameter setting."""
    from sklearn.model_selection import KFold

    scores = []
    for tr, va in KFold(n_splits=folds, shuffle=True, random_state=seed).split(X):
        sub = None if texts is None else [texts[i] for i in tr]
        head = fit_head(name, params, X[tr], Y[tr], None if task_ids is None else task_ids[tr], sub)
        pred = predict_head(head, X[va], None if texts is None else [texts[i] for i in va])
        scores.append(float(np.mean(routed_scores(pred, Y[va]))))
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
    texts: Sequence[str] | None = None,
) -> tuple[dict[str, Any], float]:
    """Grid search: returns the best ``base_params`` updated with the winning grid values, and its CV score.

    ``texts``: the n prompts of the rows of ``X``, needed when a setting makes the head read text.
    """
    from tqdm.auto import tqdm

    best_params, best_score = dict(base_params), -np.inf
    candidates = param_grid(grid)
    for combo in tqdm(candidates, desc=f"tune {name}", disable=not progress or len(candidates) < 2):
        params = {**base_params, **combo}
        score = cv_quality(name, params, X, Y, task_ids, folds=folds, seed=seed, texts=texts)
        log.info("tune %s %s: cv quality %.4f", name, combo, score)
        if score > best_score:
            best_params, best_score = params, score
    return best_params, float(best_score)


def nested_cv_scores(
    table: pd.DataFrame,
    embeddings: Mapping[str, np.ndarray],
    heads: Sequence[str],
    grids: Mapping[str, Mapping[str, Sequence[Any]]],
    task_key: Mapping[str, str] | None = None,
    outer_folds: int = 5,
    inner_folds: int = 3,
    seed: int = 0,
    references: Mapping[str, Reference] | None = None,
) -> dict[str, Any]:
    """Nested cross-validation: every prompt of ``table`` is routed once by heads that never saw it.

    Outer folds are :func:`router_ml.data.splits.kfold_prompts` (groups of prompts with the same
    normalised text, stratified by task, seeded). For each outer fold, using its outer-training
    part only: the best single model is chosen, each head in ``heads`` is tuned over
    ``grids[head]`` by ``inner_folds``-fold CV (:func:`tune_quality_head`), fitted, and predicts
    the held-out outer fold. ``task_key[head]`` names the table column whose labels become the
    head's ``task_ids`` (default ``"task"``); ``embeddings`` maps each prompt text to its vector.
    ``references`` are non-router baselines ``f(prompts_tr, Y_tr, prompts_te, Y_te) -> (n_te,)``.

    Returns per-prompt arrays in one order (``n`` = number of prompts): ``prompt_id``, ``fold``,
    ``Y (n, m)``, ``best_single``, ``oracle``, ``random``, ``heads[name]``,
    ``references[name]`` (routed scores, ``(n,)``), plus per fold ``best_single_model``,
    ``params[name]``, ``cv[name]``, ``tune_s[name]`` and ``fit_s[name]``.
    """
    import time

    from router_ml.data.schema import to_wide
    from router_ml.data.splits import kfold_prompts
    from router_ml.data.taxonomy import task_ids_of
    from router_ml.metrics import best_single_model, oracle_scores, random_scores

    models = sorted(table["model"].unique())
    task_key = dict(task_key or {})
    refs = dict(references or {})
    parts: dict[str, list[Any]] = {"prompt_id": [], "fold": [], "Y": [], "best_single": []}
    per_head: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    per_ref: dict[str, list[np.ndarray]] = {r: [] for r in refs}
    log_: dict[str, dict[str, list[Any]]] = {
        k: {h: [] for h in heads} for k in ("params", "cv", "tune_s", "fit_s")
    }
    chosen = []
    for k, (tr_df, te_df) in enumerate(kfold_prompts(table, outer_folds, seed=seed)):
        (p_tr, Y_tr, _), (p_te, Y_te, _) = to_wide(tr_df, models), to_wide(te_df, models)
        X_tr = np.stack([embeddings[t] for t in p_tr["prompt"]])
        X_te = np.stack([embeddings[t] for t in p_te["prompt"]])
        t_tr, t_te = list(p_tr["prompt"]), list(p_te["prompt"])
        best = best_single_model(Y_tr)
        chosen.append(models[best])
        parts["prompt_id"].append(p_te["prompt_id"].to_numpy())
        parts["fold"].append(np.full(len(p_te), k))
        parts["Y"].append(Y_te)
        parts["best_single"].append(Y_te[:, best])
        for name, ref in refs.items():
            per_ref[name].append(np.asarray(ref(p_tr, Y_tr, p_te, Y_te), dtype=np.float64))
        for name in heads:
            tid = task_ids_of(p_tr[task_key.get(name, "task")])
            t0 = time.perf_counter()
            params, cv = tune_quality_head(
                name, {}, grids.get(name, {}), X_tr, Y_tr, tid, inner_folds, seed, False, t_tr
            )
            t1 = time.perf_counter()
            head = fit_head(name, params, X_tr, Y_tr, tid, t_tr)
            log_["fit_s"][name].append(time.perf_counter() - t1)
            per_head[name].append(routed_scores(predict_head(head, X_te, t_te), Y_te))
            log_["tune_s"][name].append(t1 - t0)
            log_["params"][name].append(params)
            log_["cv"][name].append(cv)
            log.info("outer fold %d %s: %s cv %.4f", k, name, params, cv)
    Y = np.concatenate(parts["Y"])
    return {
        "models": models,
        "prompt_id": np.concatenate(parts["prompt_id"]),
        "fold": np.concatenate(parts["fold"]),
        "Y": Y,
        "best_single": np.concatenate(parts["best_single"]),
        "oracle": oracle_scores(Y),
        "random": random_scores(Y),
        "heads": {h: np.concatenate(v) for h, v in per_head.items()},
        "references": {r: np.concatenate(v) for r, v in per_ref.items()},
        "best_single_model": chosen,
        **log_,
    }
