"""``train(cfg) -> metrics``: the plain, testable body of ``python -m experiments.train``.

Steps: load the routing table -> leak-free split by prompt (and optionally whole tasks held out)
-> embed every prompt once (on-disk cache) -> fit the task head on labelled prompts -> optionally
tune the quality head by k-fold CV inside the training part -> fit it -> calibrate on its
out-of-fold predictions over the training part and its predictions of the validation part (as the
exported, refitted router is calibrated) -> score the held-out test part -> write the checkpoint
(with the policy fit set a proxy fits its policies on) and ``metrics.json``.
Every ``test/`` figure comes from prompts the run never trained, tuned or calibrated on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from router_ml.data.schema import table_hash, to_wide, wide_column
from router_ml.data.taxonomy import TASK_TYPES, task_ids_of
from router_ml.metrics import (
    best_single_model,
    gap_closed,
    oracle_scores,
    paired_bootstrap,
    random_scores,
    routed_scores,
)
from router_ml.predictors.tuning import fit_head, head_layers, predict_head, tune_quality_head

log = logging.getLogger(__name__)


def _as_dict(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def split_data(table: pd.DataFrame, split_cfg: Mapping[str, Any], seed: int) -> dict[str, pd.DataFrame]:
    """train / val / test (+ ood when ``holdout_tasks`` is set), grouped by prompt."""
    from router_ml.data.splits import split_prompts, split_tasks

    out: dict[str, pd.DataFrame] = {}
    pool = table
    holdout = split_cfg.get("holdout_tasks")
    if holdout:
        parts = split_tasks(table, list(holdout), by=split_cfg.get("holdout_by", "source_task"))
        pool, out["ood"] = parts["train"], parts["test"]
    parts = split_prompts(
        pool,
        test_size=float(split_cfg.get("test_size", 0.2)),
        val_size=float(split_cfg.get("val_size", 0.1)),
        seed=seed,
    )
    out.update(parts)
    return out


def task_training_data(
    splits: dict[str, pd.DataFrame], cfg: Mapping[str, Any], seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) frames of (prompt, task) for the task head; no test text is ever trained on."""
    from router_ml.data.labelled import load_labelled

    rng = np.random.default_rng(seed)
    held_texts = set()
    for name in ("val", "test", "ood"):
        if name in splits:
            held_texts |= set(splits[name]["prompt"])
    train_parts = []
    if cfg.get("routing_table", True):
        pr = splits["train"].drop_duplicates("prompt_id")[["prompt", "task", "source_task"]]
        cap = int(cfg.get("max_per_source_task", 10))
        pr = pr.groupby("source_task", group_keys=False).apply(
            lambda g: g.sample(n=min(cap, len(g)), random_state=int(rng.integers(1 << 31)))
        )
        train_parts.append(pr[["prompt", "task"]])
    project = load_labelled("project")[["prompt", "task"]]
    in_table = project["prompt"].isin(held_texts) | project["prompt"].isin(set(splits["train"]["prompt"]))
    free = project[~in_table]
    if len(free):
        test_frac = float(cfg.get("project_test_size", 0.3))
        test_idx = (
            free.groupby("task", group_keys=False)
            .apply(lambda g: g.sample(frac=test_frac, random_state=seed))
            .index
        )
        test = pd.concat([free.loc[test_idx], project[project["prompt"].isin(held_texts)]])
        train_parts.append(free.drop(index=test_idx))
    else:  # the routing table IS the project set (simulated data): its held-out prompts are the test
        test = project[project["prompt"].isin(held_texts)]
    train_parts.append(project[project["prompt"].isin(set(splits["train"]["prompt"]))])
    train = pd.concat(train_parts, ignore_index=True).drop_duplicates("prompt")
    train = train[~train["prompt"].isin(set(test["prompt"]))]
    return train.reset_index(drop=True), test.drop_duplicates("prompt").reset_index(drop=True)


def routing_metrics(prefix: str, pred: np.ndarray, Y: np.ndarray, best: int) -> dict[str, float]:
    """Routed quality vs best single model (column ``best``), random and oracle, with a bootstrap CI."""
    routed = routed_scores(pred, Y)
    single = Y[:, best]
    ok = ~np.isnan(single)
    q, b, o = float(routed.mean()), float(np.nanmean(single)), float(oracle_scores(Y).mean())
    diff, lo, hi = paired_bootstrap(routed[ok], single[ok])
    return {
        f"{prefix}/quality": q,
        f"{prefix}/best_single_quality": b,
        f"{prefix}/random_quality": float(random_scores(Y).mean()),
        f"{prefix}/oracle_quality": o,
        f"{prefix}/gap_closed": gap_closed(q, b, o),
        f"{prefix}/gain_over_best_single": diff,
        f"{prefix}/gain_over_best_single_ci_lo": lo,
        f"{prefix}/gain_over_best_single_ci_hi": hi,
        f"{prefix}/n_prompts": float(len(Y)),
    }


def out_of_fold(
    head_name: str,
    params: Mapping[str, Any],
    prompts: pd.DataFrame,
    H: np.ndarray,
    Y: np.ndarray,
    tid: np.ndarray,
    folds: int,
    seed: int,
) -> np.ndarray:
    """``(n, m)``: each row of ``prompts`` (a wide frame: ``prompt_id``, ``prompt``, ``task``)
    predicted by the quality head ``head_name`` / ``params`` fitted on the other ``folds - 1`` folds
    (prompt groups, stratified by task); ``H (n, d)`` the head's features, ``Y (n, m)``, ``tid (n,)``
    task ids."""
    from router_ml.data.splits import kfold_prompts

    row = pd.Series(np.arange(len(prompts)), index=prompts["prompt_id"].to_numpy())
    texts = list(prompts["prompt"])
    out = np.full(np.shape(Y), np.nan)
    for k, (tr, va) in enumerate(kfold_prompts(prompts, folds, seed=seed)):
        a, b = row[tr["prompt_id"]].to_numpy(), row[va["prompt_id"]].to_numpy()
        head = fit_head(head_name, params, H[a], Y[a], tid[a], [texts[i] for i in a])
        out[b] = predict_head(head, H[b], [texts[i] for i in b])
        log.info("calibration: out-of-fold predictions, fold %d/%d (%d prompts)", k + 1, folds, len(b))
    return out


def calibration_folds(cfg: Mapping[str, Any]) -> int:
    """``calibrator.folds`` (default 5): the out-of-fold predictions the calibrator is fitted on."""
    return int((cfg.get("calibrator") or {}).get("folds", 5))


def fit_calibrator(
    name: str,
    folds: int,
    head_name: str,
    params: Mapping[str, Any],
    prompts: pd.DataFrame,
    H: np.ndarray,
    Y: np.ndarray,
    tid: np.ndarray,
    seed: int,
    held_out: tuple[np.ndarray, np.ndarray] | None = None,
    oof: np.ndarray | None = None,
) -> Any | None:
    """The router's calibrator ``name`` (None for ``"none"``), fitted on :func:`out_of_fold`
    predictions of the head over its own training prompts, plus ``held_out = (predictions, Y)``
    pairs of prompts the fitted head never saw (a validation part). The main job's split, the shift
    harness and the exported (refitted) router all calibrate this way, so the held-out figures
    measure the calibration the checkpoint serves: an isotonic map fitted on a 10% validation part
    alone moved the argmax enough to cost 1.7 of 3.5 points in distribution (README). ``oof``:
    those out-of-fold predictions when already made (to fit several calibrators on one set)."""
    from router_ml.predictors import build_calibrator

    if name == "none":
        return None
    if oof is None:
        oof = out_of_fold(head_name, params, prompts, H, Y, tid, folds, seed)
    pred, target = [oof], [np.asarray(Y)]
    if held_out is not None and len(held_out[0]):
        pred.append(np.asarray(held_out[0]))
        target.append(np.asarray(held_out[1]))
    return build_calibrator(name).fit(np.vstack(pred), np.vstack(target))


def guard_layers(guard: Mapping[str, Any] | None) -> list[int]:
    """The encoder layers a guard config ``{params: {layers: ...}}`` (``guard`` of the main job,
    ``shift.guard`` of a shift run) has its distances read; may be none."""
    return [int(k) for k in (((guard or {}).get("params") or {}).get("layers") or [])]


def fit_guard(
    cfg: Mapping[str, Any],
    head_name: str,
    params: Mapping[str, Any],
    prompts: pd.DataFrame,
    X: np.ndarray,
    Y: np.ndarray,
    seed: int,
    calibrator: Any | None = None,
    H: np.ndarray | None = None,
    G: np.ndarray | None = None,
    cost: np.ndarray | None = None,
) -> Any | None:
    """A :class:`~router_ml.predictors.guard.NoveltyGuard` for the quality head ``head_name`` /
    ``params`` on these training prompts (embeddings ``X (n, d)``, the head's own features ``H``
    when it reads encoder layers, the guard's ``G`` when it does (:func:`guard_layers`),
    ``Y (n, m)``, ``cost (n, m)`` their $ per model: the guard's ties at the top are broken over
    the utility policy's frontier), fitted by family-grouped CV
    of that head over ``cfg.guard.family_by``, its intervals on the scale of the router's fitted
    ``calibrator`` (if any); None when ``guard.enabled`` is false or the prompts hold fewer than two
    families (nothing to hold out)."""
    from router_ml.predictors.guard import NoveltyGuard

    gcfg = cfg.get("guard") or {}
    if not gcfg.get("enabled", False):
        return None
    family_by = gcfg.get("family_by", "source_task")
    if family_by not in prompts.columns or prompts[family_by].nunique() < 2:
        log.warning("guard: fewer than two %r families in the training prompts; no novelty guard", family_by)
        return None
    key = cfg["predictor"].get("task_key", "task")
    tid, texts = task_ids_of(prompts[key]), list(prompts["prompt"])

    F = X if H is None else H

    def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        head = fit_head(head_name, params, F[tr], Y[tr], tid[tr], [texts[i] for i in tr])
        return predict_head(head, F[te], [texts[i] for i in te])

    guard = NoveltyGuard(**{"seed": seed, **(gcfg.get("params") or {})})
    if guard.layers and G is None:
        raise ValueError(f"fit_guard: guard.params.layers={guard.layers} needs the guard's features G")
    calibrate = calibrator.transform if calibrator is not None else None
    return guard.fit(
        X if G is None else G,
        Y,
        prompts[family_by].astype(str).to_numpy(),
        fit_predict,
        texts=texts,
        calibrate=calibrate,
        cost=cost,
    )


@dataclass
class FittedRouter:
    """A router fitted on one split, with what evaluation needs: the cached embeddings and the wide
    score matrices of every split (``wide[name] = (prompts, Y, models)``)."""

    router: Any
    models: list[str]
    wide: dict[str, tuple[pd.DataFrame, np.ndarray, list[str]]]
    embeddings: dict[str, np.ndarray]
    best: int
    metrics: dict[str, float] = field(default_factory=dict)
    encoder: Any = None  # the cached encoder (task features with layers come from it)

    def X_of(self, prompts: pd.Series | list[str]) -> np.ndarray:
        return np.stack([self.embeddings[p] for p in prompts]).astype("float32")

    def task_X_of(self, prompts: pd.Series | list[str]) -> np.ndarray:
        """The task head's features: the embeddings, or with ``layers`` the wide encoder output."""
        layers = tuple(self.router.task_head.layers)
        return self.encoder.encode_layers(list(prompts), layers) if layers else self.X_of(prompts)

    def head_X_of(self, prompts: pd.Series | list[str], layers: Sequence[int] = ()) -> np.ndarray:
        """A quality head's features: the embeddings, then the pooled states of its ``layers``."""
        return self.encoder.encode_layers(list(prompts), tuple(layers)) if layers else self.X_of(prompts)

    def fit_head(
        self, predictor_cfg: Mapping[str, Any], calibrator_name: str = "none", seed: int = 0, folds: int = 5
    ) -> Any:
        """Another quality head on the same training split (for comparisons such as kNN); returns a
        ``predict(X) -> (n, m)`` object, calibrated as the router's head is (:func:`fit_calibrator`,
        ``folds`` of them) when asked."""
        prompts_tr, Y_tr, _ = self.wide["train"]
        layers = head_layers(predictor_cfg)
        X_tr = self.head_X_of(prompts_tr["prompt"], layers)
        tid = task_ids_of(prompts_tr[predictor_cfg.get("task_key", "task")])
        params = dict(predictor_cfg.get("params") or {})
        head = fit_head(predictor_cfg["name"], params, X_tr, Y_tr, tid, texts=list(prompts_tr["prompt"]))
        held_out = None
        if calibrator_name != "none" and "val" in self.wide and len(self.wide["val"][0]):
            prompts_va, Y_va, _ = self.wide["val"]
            raw = predict_head(head, self.head_X_of(prompts_va["prompt"], layers), list(prompts_va["prompt"]))
            held_out = (raw, Y_va)
        cal = fit_calibrator(
            calibrator_name, folds, predictor_cfg["name"], params, prompts_tr, X_tr, Y_tr, tid, seed, held_out
        )
        return head if cal is None else _Calibrated(head, cal)


@dataclass
class _Calibrated:
    head: Any
    calibrator: Any

    @property
    def layers(self) -> Sequence[int]:
        return self.head.layers

    @property
    def uses_text(self) -> bool:
        return bool(self.head.uses_text)

    def predict(self, X: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:

        return self.calibrator.transform(predict_head(self.head, X, texts))


def fit_router(
    cfg: Mapping[str, Any],
    table: pd.DataFrame,
    splits: dict[str, pd.DataFrame],
    seed: int,
    encoder: Any | None = None,
    task_head: Any | None = None,
) -> FittedRouter:
    """Embed, fit the task head (unless given), tune and fit the quality head, calibrate, score."""
    from router_ml.embeddings import CachedEncoder, build_encoder
    from router_ml.predictors import TaskClassifier
    from router_ml.predictors.calibration import expected_calibration_error
    from router_ml.router import LearnedRouter

    metrics: dict[str, float] = {}
    models = sorted(table["model"].unique())
    wide = {name: to_wide(df, models) for name, df in splits.items()}
    log.info(
        "data %s: %d prompts x %d models; %s",
        cfg["data"].get("name"),
        table["prompt_id"].nunique(),
        len(models),
        {k: len(v[0]) for k, v in wide.items()},
    )

    encoder = encoder or build_encoder(cfg["encoder"])
    cached = CachedEncoder(encoder, cache_dir=cfg.get("cache_dir"))
    task_train, task_test = task_training_data(splits, cfg.get("task_data", {}), seed)
    if task_head is None:
        task_head = TaskClassifier(labels=list(TASK_TYPES), **cfg.get("task_head", {}).get("params", {}))
    layers = tuple(task_head.layers)
    if layers and not hasattr(encoder, "encode_layers"):
        raise ValueError(
            f"task_head.params.layers={list(layers)} needs an encoder that gives its layer states "
            f"(a sentence-transformers model); encoder {encoder.id!r} does not: set task_head.params.layers=[]"
        )
    t0 = time.perf_counter()
    # the task head's prompts in one forward pass: with layers, their embedding is the first block
    task_texts = sorted(set(task_train["prompt"]) | set(task_test["prompt"]))
    task_X = dict(zip(task_texts, cached.encode_layers(task_texts, layers), strict=True)) if layers else {}
    emb = {t: v[: encoder.dim] for t, v in task_X.items()}
    rest = sorted((set(table["prompt"]) | set(task_texts)) - set(emb))
    emb.update(zip(rest, cached.encode(rest), strict=True))
    metrics["time/embed_s"] = time.perf_counter() - t0

    def X_of(prompts: pd.Series) -> np.ndarray:
        return np.stack([emb[p] for p in prompts]).astype("float32")

    def X_task(prompts: pd.Series) -> np.ndarray:  # with layers: the embedding and layer states
        return np.stack([task_X[p] for p in prompts]) if layers else X_of(prompts)

    pcfg = cfg["predictor"]
    q_layers = head_layers(pcfg)
    if q_layers and not hasattr(encoder, "encode_layers"):
        raise ValueError(
            f"predictor.params.layers={q_layers} needs an encoder that gives its layer states "
            f"(a sentence-transformers model); encoder {encoder.id!r} does not: pass "
            "predictor=taskmix (or predictor.params.layers=[]) with this encoder"
        )

    def X_head(prompts: pd.Series) -> np.ndarray:  # the quality head's: with layers, their states too
        return cached.encode_layers(list(prompts), tuple(q_layers)) if q_layers else X_of(prompts)

    g_layers = guard_layers(cfg.get("guard")) if (cfg.get("guard") or {}).get("enabled") else []
    if g_layers and not hasattr(encoder, "encode_layers"):
        raise ValueError(
            f"guard.params.layers={g_layers} needs an encoder that gives its layer states "
            f"(a sentence-transformers model); encoder {encoder.id!r} does not: pass "
            "guard.params.layers=[] with this encoder"
        )

    if not hasattr(task_head, "coef_"):
        t0 = time.perf_counter()
        task_head.fit(
            X_task(task_train["prompt"]), list(task_train["task"]), texts=list(task_train["prompt"])
        )
        metrics["time/task_head_train_s"] = time.perf_counter() - t0
    if len(task_test):
        from sklearn.metrics import accuracy_score, f1_score

        pred_t = task_head.predict(X_task(task_test["prompt"]), texts=list(task_test["prompt"]))
        metrics["test/task_macro_f1"] = float(f1_score(task_test["task"], pred_t, average="macro"))
        metrics["test/task_accuracy"] = float(accuracy_score(task_test["task"], pred_t))
        metrics["test/task_n_prompts"] = float(len(task_test))

    prompts_tr, Y_tr, _ = wide["train"]
    X_tr, H_tr = X_of(prompts_tr["prompt"]), X_head(prompts_tr["prompt"])
    tid_tr = task_ids_of(prompts_tr[pcfg.get("task_key", "task")])
    params = dict(pcfg.get("params") or {})
    tune_cfg = cfg.get("tune") or {}
    if tune_cfg.get("enabled") and tune_cfg.get("grid", {}).get(pcfg["name"]):
        t0 = time.perf_counter()
        params, cv = tune_quality_head(
            pcfg["name"],
            params,
            tune_cfg["grid"][pcfg["name"]],
            H_tr,
            Y_tr,
            tid_tr,
            folds=int(tune_cfg.get("folds", 3)),
            seed=seed,
            texts=list(prompts_tr["prompt"]),
        )
        metrics["cv/best_quality"] = cv
        metrics["time/tune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = fit_head(pcfg["name"], params, H_tr, Y_tr, tid_tr, texts=list(prompts_tr["prompt"]))
    metrics["time/quality_head_train_s"] = time.perf_counter() - t0

    cal_name = (cfg.get("calibrator") or {}).get("name", "none")
    held_out = None
    if cal_name != "none" and "val" in wide and len(wide["val"][0]):
        prompts_va, Y_va, _ = wide["val"]
        held_out = (predict_head(head, X_head(prompts_va["prompt"]), list(prompts_va["prompt"])), Y_va)
    t0 = time.perf_counter()
    calibrator = fit_calibrator(
        cal_name, calibration_folds(cfg), pcfg["name"], params, prompts_tr, H_tr, Y_tr, tid_tr, seed, held_out
    )
    if calibrator is not None:
        metrics["time/calibrator_train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    G_tr = cached.encode_layers(list(prompts_tr["prompt"]), tuple(g_layers)) if g_layers else None
    C_tr = wide_column(splits["train"], prompts_tr, models, "cost_usd")
    guard = fit_guard(
        cfg, pcfg["name"], params, prompts_tr, X_tr, Y_tr, seed, calibrator, H=H_tr, G=G_tr, cost=C_tr
    )
    if guard is not None:
        metrics["time/guard_train_s"] = time.perf_counter() - t0
        metrics["cv/guard_novelty_auroc"] = guard.cv_auroc_
        (
            metrics["cv/guard_shrink_in_distribution"],
            metrics["cv/guard_shrink_novel"],
            metrics["cv/guard_shrink_floor"],
        ) = guard.shrink_.tolist()
        (
            metrics["cv/guard_margin_base"],
            metrics["cv/guard_margin_slope"],
            metrics["cv/guard_margin_floor"],
        ) = guard.margin_.tolist()

    best = best_single_model(Y_tr)
    metrics["train/best_single_model_index"] = float(best)
    novelty: dict[str, np.ndarray] = {}
    for name in ("test", "ood"):
        if name not in wide or not len(wide[name][0]):
            continue
        prompts_s, Y_s, _ = wide[name]
        # what the guard reads: the embeddings, then its layers' states
        X_s = (
            cached.encode_layers(list(prompts_s["prompt"]), tuple(g_layers))
            if g_layers
            else X_of(prompts_s["prompt"])
        )
        raw = predict_head(head, X_head(prompts_s["prompt"]), list(prompts_s["prompt"]))
        # routed as the router serves: head -> calibrator -> guard (``name/``); the router before
        # its guard (``name/unguarded/``) and the head's own argmax (``name/uncalibrated/``) beside it
        calibrated = calibrator.transform(raw) if calibrator is not None else raw
        g = guard.transform(X_s, calibrated, texts=list(prompts_s["prompt"])) if guard is not None else None
        metrics.update(routing_metrics(name, g.quality if g is not None else calibrated, Y_s, best))
        if g is not None:
            metrics.update(routing_metrics(f"{name}/unguarded", calibrated, Y_s, best))
        metrics[f"{name}/ece_raw"] = expected_calibration_error(raw, Y_s)
        if calibrator is not None:
            metrics.update(routing_metrics(f"{name}/uncalibrated", raw, Y_s, best))
            metrics[f"{name}/ece"] = expected_calibration_error(calibrated, Y_s)
        if g is not None:
            ok = ~np.isnan(Y_s)
            inside = (Y_s >= g.lower - 1e-9) & (Y_s <= g.upper + 1e-9)
            metrics[f"{name}/interval_coverage"] = float(inside[ok].mean())
            novelty[name] = g.novelty
    if len(novelty) == 2:
        from sklearn.metrics import roc_auc_score

        lab = np.r_[np.zeros(len(novelty["test"])), np.ones(len(novelty["ood"]))]
        metrics["ood/novelty_auroc"] = float(roc_auc_score(lab, np.r_[novelty["test"], novelty["ood"]]))

    router = LearnedRouter(
        encoder,
        task_head,
        head,
        models,
        calibrator=calibrator,
        guard=guard,
        metadata={
            "name": cfg.get("name", "router"),
            "training": {
                "data": cfg["data"].get("name"),
                "data_config": dict(cfg["data"]),
                "split": dict(cfg.get("split") or {}),
                "data_hash": table_hash(table),
                "n_prompts": int(table["prompt_id"].nunique()),
                "n_train_prompts": len(prompts_tr),
                "best_single_model": models[best],
                "seed": seed,
            },
        },
    )
    return FittedRouter(router, models, wide, emb, best, metrics, encoder=cached)


def refit_on_all(
    cfg: Mapping[str, Any], table: pd.DataFrame, fitted: FittedRouter, seed: int
) -> tuple[Any, dict[str, Any]]:
    """The router to export: the hyper-parameters chosen on the split, fitted on EVERY labelled
    prompt (the held-out figures were measured before, on the split's router).

    The quality head is refitted on all of ``table``; its calibrator on out-of-fold predictions
    (``calibrator.folds`` folds of prompt groups, each predicted by a head that never saw it:
    :func:`fit_calibrator`, as the split's router was calibrated); the task
    head on all of its training data, the held-out project prompts included. Returns the router
    and what the checkpoint records of the refit."""
    from router_ml.router import LearnedRouter

    t0 = time.perf_counter()
    old, models, cached = fitted.router, fitted.models, fitted.encoder
    folds = calibration_folds(cfg)
    key = cfg["predictor"].get("task_key", "task")
    name, params = type(old.quality_head).name, old.quality_head.get_params()

    q_layers = tuple(old.quality_layers)
    prompts, Y, _ = to_wide(table, models)
    texts = list(prompts["prompt"])
    H = (cached.encode_layers(texts, q_layers) if q_layers else cached.encode(texts)).astype("float32")
    X = H[:, : int(cached.dim)] if q_layers else H  # the embeddings: what the guard reads
    tid = task_ids_of(prompts[key])
    calibrator = (
        fit_calibrator(type(old.calibrator).name, folds, name, params, prompts, H, Y, tid, seed)
        if old.calibrator is not None
        else None
    )
    head = fit_head(name, params, H, Y, tid, texts)
    g_layers = tuple(old.guard_layers)
    G = cached.encode_layers(texts, g_layers).astype("float32") if g_layers else None
    guard = (
        fit_guard(
            cfg,
            name,
            params,
            prompts,
            X,
            Y,
            seed,
            calibrator,
            H=H,
            G=G,
            cost=wide_column(table, prompts, models, "cost_usd"),
        )
        if old.guard is not None
        else None
    )

    task_train, task_test = task_training_data({"train": table}, cfg.get("task_data", {}), seed)
    task_all = pd.concat([task_train, task_test], ignore_index=True).drop_duplicates("prompt")
    layers = tuple(old.task_head.layers)
    t_texts = list(task_all["prompt"])
    X_task = cached.encode_layers(t_texts, layers) if layers else cached.encode(t_texts)
    task_head = type(old.task_head)(**old.task_head.get_params()).fit(
        X_task, list(task_all["task"]), texts=t_texts
    )

    record = {
        "n_prompts": len(prompts),
        "n_task_prompts": len(task_all),
        "calibration": f"out-of-fold predictions, {folds} folds" if calibrator is not None else None,
        "guard": "family-grouped CV on every labelled prompt" if guard is not None else None,
        "note": "refitted on every labelled prompt after the held-out figures were measured",
    }
    meta = dict(old.metadata)
    meta["training"] = {**meta.get("training", {}), "refit": record}
    router = LearnedRouter(
        old.encoder, task_head, head, models, calibrator=calibrator, metadata=meta, guard=guard
    )
    return router, {"time/refit_s": time.perf_counter() - t0}


def default_policy_fit(router: Any) -> Any:
    """The checkpoint's policy fit set: the router's predictions for the project's labelled prompts,
    :data:`~router_ml.decision.fit_set.PER_TASK` per task type (what a proxy fits its policies on)."""
    from router_ml.decision.fit_set import PER_TASK, PolicyFitSet, policy_fit_prompts

    source = f"the project's labelled prompts (data/labelled_prompts/), the first {PER_TASK} per task type"
    return PolicyFitSet.of_router(router, policy_fit_prompts(), source=source)


def train(cfg: Any, run_dir: str | Path | None = None) -> dict[str, float]:
    """Train one router from a (Hydra or plain dict) config; returns the metrics it also writes."""
    from router_ml.data.loading import load_routing_data

    cfg = _as_dict(cfg)
    seed = int(cfg.get("seed", 0))
    run_dir = Path(run_dir or cfg.get("run_dir") or ".")
    table = load_routing_data(cfg["data"], seed=seed)
    splits = split_data(table, cfg.get("split", {}), seed)
    fitted = fit_router(cfg, table, splits, seed)
    router = fitted.router
    if (cfg.get("refit") or {}).get("enabled", False):
        router, extra = refit_on_all(cfg, table, fitted, seed)
        fitted.metrics.update(extra)
    router.policy_fit = default_policy_fit(router)
    measured = cfg["data"].get("measured")
    if measured:  # the data's own calls price and time its models (a collection store)
        from router_ml.decision.measured import CONFIG_KEY, MeasuredFigures

        source = f"data {cfg['data'].get('name')!r}: {table['prompt_id'].nunique()} prompts' measured calls"
        opts = measured if isinstance(measured, Mapping) else {}  # `measured: true` takes the defaults
        figures = MeasuredFigures.fit(table, min_count=int(opts.get("min_count", 5)), source=source)
        router.metadata[CONFIG_KEY] = figures.to_config()
    metrics = {k: float(v) for k, v in sorted(fitted.metrics.items())}
    router.save_pretrained(run_dir / "checkpoint", metrics=metrics)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
