"""Routing under distribution shift: ``evaluate_shift(cfg, run_dir)``, run by
``python -m experiments.evaluate shift=<mode>`` (conf/shift/).

Modes (``cfg.shift.name``):

- ``leave_one_family_out``: one fold per task family (``shift.family_by``, default the data's
  ``source_task``: llmrouter_ulab's 14 benchmarks, routerdc_7models' benchmark files, MMLU-Pro's 14
  subjects, ZeroEval's 3 tasks). The fold's test set is every prompt of that family; everything is
  fitted on the OTHER families only: the quality heads, their calibration (out-of-fold predictions
  over the training families and a ``val_size`` part of them), the utility policy and the best
  single model. Training prompts whose normalised text also occurs in the held-out family are
  dropped (:func:`split_tasks`). ``shift.family_groups`` (``{group: [family, ...]}``) holds
  families out together (:func:`group_families`: routerdc_7models' ARC-Easy and ARC-Challenge
  files are one benchmark).
- ``in_distribution``: the same pipeline over ``folds`` folds of prompt groups (stratified by task),
  so every prompt is tested once by a router that saw its family: the like-for-like reference.
- ``format``: the ``in_distribution`` folds, trained on the ``train_rendering`` of the training
  items and tested on each of ``renderings`` of the held-out items
  (:mod:`router_ml.evaluation.renderings`; outcomes and costs are the original item's).

Per test prompt it keeps: the observed scores of every model, the score of the best single model
(chosen on the fold's training part), the score of each head's argmax of the quality the router
serves (head -> calibrator -> guard, as :class:`~router_ml.router.LearnedRouter`), and the score and
$ of the utility policy at every knob value of its sweep (the same estimates, as
``experiments.evaluate``). The per-prompt
rows of all folds are pooled and summarised by :mod:`router_ml.evaluation.shift_report`.

Heads: ``learned`` = the run's ``predictor`` (evaluate's default: taskmix), then ``compare_heads``
(kNN) and ``shift.heads`` (the main job's MLP), each named by its predictor name. The task head
(predicted task types feed the cost model's output-length expectation) is fitted once on the
project's own labelled prompts only, so it never sees a held-out family.

Models: only models with an outcome for at least ``min_model_coverage`` of every family's prompts
and a price are kept, then only prompts with an outcome for every kept model (so the best single
model can be scored on every held-out prompt). One seed (``seeds[0]``) fixes the folds and the
calibration part.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from router_ml.data.schema import to_wide, wide_column
from router_ml.metrics import best_single_model, routed_scores
from router_ml.predictors.tuning import head_layers

log = logging.getLogger(__name__)

MODES = ("leave_one_family_out", "in_distribution", "format")
#: the reference row of every shift run: no head, the training part's per-model means (the
#: single model the training data favours at each willingness to pay)
PRIOR = "prior"

__all__ = [
    "MODES",
    "PRIOR",
    "FoldScores",
    "evaluate_shift",
    "fold_scores",
    "kfold_folds",
    "lofo_folds",
    "shift_heads",
    "shift_table",
]


@dataclass
class FoldScores:
    """Per-prompt results of one fold's test set (``n`` prompts, ``m`` models, ``L`` knob values)."""

    fold: str
    rendering: str
    prompt_id: np.ndarray  # (n,)
    family: np.ndarray  # (n,)
    Y: np.ndarray  # (n, m) observed scores
    cost: np.ndarray  # (n, m) the data's $ of each call
    best: int  # best single model, chosen on the fold's training part
    routed: dict[str, np.ndarray] = field(default_factory=dict)  # head -> (n,) argmax scores
    util_score: dict[str, np.ndarray] = field(default_factory=dict)  # head -> (n, L)
    util_cost: dict[str, np.ndarray] = field(default_factory=dict)  # head -> (n, L)
    # guarded heads (``<head>+guard``, or ``<head>+<mode>`` per shift.guard.modes): novelty of the
    # test prompts (n,) and of the fold's in-distribution validation prompts (k,), whether each
    # model's interval held its score (n, m)
    novelty: dict[str, np.ndarray] = field(default_factory=dict)
    novelty_id: dict[str, np.ndarray] = field(default_factory=dict)
    covered: dict[str, np.ndarray] = field(default_factory=dict)
    guard_fit: dict[str, dict[str, Any]] = field(default_factory=dict)
    # mode "trust": the deferral model's predicted gain (n,) and whether the head's own pick left the
    # best single model (n,), to score how well it tells when the head is worse
    trust: dict[str, np.ndarray] = field(default_factory=dict)
    moved: dict[str, np.ndarray] = field(default_factory=dict)


# ---- data and folds --------------------------------------------------------------------------
def group_families(
    table: pd.DataFrame, family_by: str, groups: Mapping[str, Sequence[str]]
) -> tuple[pd.DataFrame, str]:
    """``(table, column)``: ``table`` with a column ``<family_by>_group`` in which the families of
    each ``groups`` entry (``{group: [family, ...]}``, e.g. one benchmark split into two files) carry
    the group's name, the other families their own; that column is the one to hold out by, so a
    group's families leave training together. Unknown families and a family in two groups raise."""
    if family_by not in table.columns:
        raise KeyError(f"shift: the table has no family column {family_by!r}")
    present = set(table[family_by].astype(str).unique())
    group_of: dict[str, str] = {}
    for group, members in groups.items():
        if isinstance(members, str) or not members:
            raise ValueError(
                f"shift.family_groups.{group}: give a non-empty list of families, got {members!r}"
            )
        for fam in map(str, members):
            if fam not in present:
                raise ValueError(
                    f"shift.family_groups.{group}: no family {fam!r} in {family_by!r}; present: {sorted(present)}"
                )
            if fam in group_of:
                raise ValueError(f"shift.family_groups: {fam!r} is in both {group_of[fam]!r} and {group!r}")
            group_of[fam] = str(group)
    column = f"{family_by}_group"
    out = table.copy()
    out[column] = out[family_by].astype(str).map(lambda f: group_of.get(f, f))
    return out, column


def shift_table(
    table: pd.DataFrame, family_by: str = "source_task", min_coverage: float = 0.98
) -> tuple[pd.DataFrame, list[str]]:
    """(table, dropped models): models with outcomes on ``min_coverage`` of EVERY family's prompts
    and a cost on every row are kept, then prompts with an outcome for every kept model."""
    if family_by not in table.columns:
        raise KeyError(f"shift: the table has no family column {family_by!r}")
    n_fam = table.groupby(family_by)["prompt_id"].nunique()
    cover = table.groupby([family_by, "model"])["prompt_id"].nunique().unstack(0).reindex(columns=n_fam.index)
    share = (cover / n_fam).fillna(0.0)
    priced = table.groupby("model")["cost_usd"].apply(lambda c: bool(c.notna().all()))
    keep = [m for m in share.index if (share.loc[m] >= min_coverage).all() and priced.get(m, False)]
    if not keep:
        raise ValueError(f"shift: no model covers {min_coverage:.0%} of every {family_by} family")
    dropped = sorted(set(table["model"]) - set(keep))
    table = table[table["model"].isin(keep)]
    counts = table.groupby("prompt_id")["model"].nunique()
    table = table[table["prompt_id"].isin(counts.index[counts == len(keep)])]
    return table.reset_index(drop=True), dropped


def lofo_folds(
    table: pd.DataFrame, family_by: str = "source_task", families: list[str] | None = None
) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """``[(family, train, test)]``: each fold holds out exactly one family (all of its prompts);
    ``families`` picks which families get a fold (default every one); training keeps all others."""
    from router_ml.data.splits import split_tasks

    present = sorted(table[family_by].astype(str).unique())
    out = []
    for fam in families or present:
        parts = split_tasks(table, [fam], by=family_by)
        out.append((str(fam), parts["train"], parts["test"]))
    return out


def kfold_folds(
    table: pd.DataFrame, k: int = 5, seed: int = 0
) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """``[(name, train, test)]`` over ``k`` folds of prompt groups (stratified by task, seeded)."""
    from router_ml.data.splits import kfold_prompts

    return [(f"fold{i}", tr, te) for i, (tr, te) in enumerate(kfold_prompts(table, k, seed=seed))]


def shift_heads(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Quality heads of a shift run, by name: the run's predictor, ``compare_heads``, ``shift.heads``."""
    heads: dict[str, dict[str, Any]] = {}
    for hcfg in [cfg["predictor"], *(cfg.get("compare_heads") or {}).values()]:
        heads.setdefault(hcfg["name"], dict(hcfg))
    for hname, hcfg in ((cfg.get("shift") or {}).get("heads") or {}).items():
        heads.setdefault(hname, dict(hcfg))
    return heads


# ---- one fold --------------------------------------------------------------------------------
@dataclass
class _Context:
    """What every fold shares: models, embeddings and predicted task types per text, the decision
    layer, the heads, the utility policy's config."""

    models: list[str]
    emb: dict[str, np.ndarray]  # per text: the embedding, then the pooled states of ``layers``
    tasks: dict[str, str]
    layer: Any
    heads: dict[str, dict[str, Any]]
    calibrator: str
    utility: dict[str, Any]
    family_by: str
    val_size: float
    seed: int
    guard: dict[str, Any] = field(default_factory=dict)  # shift.guard: {heads: [...], params: {...}}
    layers: tuple[int, ...] = ()  # the encoder layers ``emb`` holds after the embedding
    dim: int = 0  # the embedding's width
    calibration_folds: int = 5  # calibrator.folds: the out-of-fold predictions it is fitted on

    def X(self, prompts: pd.DataFrame, layers: Sequence[int] = ()) -> np.ndarray:
        """The prompts' embeddings, then the states of ``layers`` (a head's :attr:`layers`)."""
        from router_ml.embeddings.base import layer_columns

        wide = np.stack([self.emb[t] for t in prompts["prompt"]]).astype("float32")
        if not self.layers:
            return wide
        return np.ascontiguousarray(wide[:, layer_columns(self.layers, layers, self.dim)])

    def estimates(self, prompts: pd.DataFrame, Y: np.ndarray, df: pd.DataFrame) -> tuple[Any, np.ndarray]:
        from router_ml.evaluation.estimates import prompt_estimates

        tasks = [self.tasks[t] for t in prompts["prompt"]]
        q0 = np.zeros_like(Y)  # the predicted quality is filled per head (the rest does not depend on it)
        est, cost, _ = prompt_estimates(self.layer, prompts, Y, self.models, q0, tasks, df)
        return est, cost


def _wide(long: pd.DataFrame, ctx: _Context) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """:func:`to_wide` over the run's models, its prompts frame carrying the family column
    (``family_by`` may be one that ``to_wide`` does not keep, e.g. :func:`group_families`')."""
    prompts, Y, models = to_wide(long, ctx.models)
    if ctx.family_by not in prompts.columns:
        fam = long.drop_duplicates("prompt_id").set_index("prompt_id")[ctx.family_by]
        prompts[ctx.family_by] = prompts["prompt_id"].map(fam).to_numpy()
    return prompts, Y, models


def fold_scores(
    ctx: _Context, fold: str, train: pd.DataFrame, tests: Mapping[str, pd.DataFrame]
) -> list[FoldScores]:
    """Fit every head on ``train`` (less a calibration part) and score each test set of ``tests``
    (rendering name -> long table of the held-out prompts)."""
    from router_ml.data.splits import split_prompts
    from router_ml.data.taxonomy import task_ids_of
    from router_ml.decision.policies import build_policy
    from router_ml.predictors.tuning import fit_head, predict_head
    from router_ml.training import fit_calibrator, guard_layers

    parts = split_prompts(train, test_size=0.0, val_size=ctx.val_size, seed=ctx.seed)
    (p_tr, Y_tr, _), (p_va, Y_va, _) = (_wide(parts[s], ctx) for s in ("train", "val"))
    best = best_single_model(Y_tr)
    C_tr = wide_column(parts["train"], p_tr, ctx.models, "cost_usd")  # what the guard's utility reads
    ref_cost = float(np.nanmean(C_tr[:, best]))
    X_tr, X_va = ctx.X(p_tr), ctx.X(p_va)  # embeddings
    glay = guard_layers(ctx.guard)
    G_tr, G_va = (ctx.X(p_tr, glay), ctx.X(p_va, glay)) if glay else (X_tr, X_va)  # what the guard reads
    t_tr, t_va = list(p_tr["prompt"]), list(p_va["prompt"])
    est_va = ctx.estimates(p_va, Y_va, parts["val"])[0] if len(p_va) else None
    util_params = {k: v for k, v in ctx.utility.items() if k not in ("heads", "sweep")}
    fitted: dict[str, tuple[Any, ...]] = {}
    for hname, hcfg in ctx.heads.items():
        tid = task_ids_of(p_tr[hcfg.get("task_key", "task")])
        lay = head_layers(hcfg)
        H_tr, H_va = (ctx.X(p_tr, lay), ctx.X(p_va, lay)) if lay else (X_tr, X_va)  # the head's features
        params = dict(hcfg.get("params") or {})
        head = fit_head(hcfg["name"], params, H_tr, Y_tr, tid, t_tr)
        policy, q_va = build_policy(dict(util_params)), None
        raw_va = predict_head(head, H_va, t_va) if est_va is not None else None
        # calibrated as the router is (training.fit_calibrator): on the head's out-of-fold
        # predictions over the training part and on the validation part
        cal = fit_calibrator(
            ctx.calibrator,
            ctx.calibration_folds,
            hcfg["name"],
            params,
            p_tr,
            H_tr,
            Y_tr,
            tid,
            ctx.seed,
            (raw_va, Y_va) if raw_va is not None else None,
        )
        if raw_va is not None:
            q_va = cal.transform(raw_va) if cal is not None else raw_va
            policy = policy.fit(dataclasses.replace(est_va, quality=q_va))
        fitted[hname] = (head, cal, policy, lay)
        if hname in (ctx.guard.get("heads") or []):
            # shift.guard.modes: one guarded row per mode (``<head>+<mode>``), sharing the guard's
            # out-of-fold head fits; without it one ``<head>+guard`` row in params' mode
            modes = ctx.guard.get("modes") or [None]
            oof_cache: dict[bytes, np.ndarray] = {}
            for mode in modes:
                fitted[f"{hname}+{mode or 'guard'}"] = _fit_guard(
                    ctx,
                    hcfg,
                    p_tr,
                    Y_tr,
                    G_tr,
                    H_tr,
                    t_tr,
                    (head, cal, policy),
                    G_va,
                    t_va,
                    q_va,
                    est_va,
                    mode,
                    oof_cache,
                    C_tr,
                )
                fitted[f"{hname}+{mode or 'guard'}"] += (lay,)

    # the reference every router is held to out of distribution: no head, every prompt's quality
    # the training part's per-model mean, so the utility policy picks, per willingness to pay, the
    # single model the training data favours (the Zero router instead knows the test set's)
    prior_q = np.nan_to_num(np.nanmean(Y_tr, axis=0))
    prior_policy = build_policy(dict(util_params))
    if est_va is not None:
        prior_policy = prior_policy.fit(
            dataclasses.replace(est_va, quality=np.broadcast_to(prior_q, Y_va.shape).copy())
        )
    out = []
    for rendering, test in tests.items():
        p_te, Y_te, _ = _wide(test, ctx)
        est, cost = ctx.estimates(p_te, Y_te, test)
        X_te, t_te = ctx.X(p_te), list(p_te["prompt"])
        G_te = ctx.X(p_te, glay) if glay else X_te
        fs = FoldScores(
            fold=fold,
            rendering=rendering,
            prompt_id=p_te["prompt_id"].to_numpy(),
            family=p_te[ctx.family_by].astype(str).to_numpy(),
            Y=Y_te,
            cost=cost,
            best=best,
        )
        for hname, (head, cal, policy, *guard, lay) in fitted.items():
            raw = predict_head(head, ctx.X(p_te, lay) if lay else X_te, t_te)
            q, lower = (cal.transform(raw) if cal is not None else raw), None
            # routed: the argmax of what the router serves and the policy ranks by: head ->
            # calibrator -> guard (its lower bound weighed by the policy's risk)
            ranked = q
            if guard:
                g, nov_va, info = guard
                gd = g.transform(G_te, q, texts=t_te)
                fs.novelty[hname], fs.novelty_id[hname], fs.guard_fit[hname] = gd.novelty, nov_va, info
                if gd.trust is not None:
                    fs.trust[hname], fs.moved[hname] = gd.trust, np.argmax(q, axis=1) != best
                q, lower = gd.quality, gd.lower
                ranked = q - policy.risk * (q - lower)
                fs.covered[hname] = np.where(
                    np.isnan(Y_te), np.nan, (Y_te >= gd.lower - 1e-9) & (Y_te <= gd.upper + 1e-9)
                )
            fs.routed[hname] = routed_scores(ranked, Y_te)
            e = dataclasses.replace(est, quality=q, quality_lower=lower)
            fs.util_score[hname], fs.util_cost[hname] = _sweep(ctx, policy, e, Y_te, cost, ref_cost)
        e = dataclasses.replace(est, quality=np.broadcast_to(prior_q, Y_te.shape).copy())
        fs.util_score[PRIOR], fs.util_cost[PRIOR] = _sweep(ctx, prior_policy, e, Y_te, cost, ref_cost)
        fs.routed[PRIOR] = Y_te[:, best]
        out.append(fs)
    return out


def _sweep(
    ctx: _Context, policy: Any, est: Any, Y: np.ndarray, cost: np.ndarray, ref_cost: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(score, $)`` each ``(n, L)``: what the utility ``policy`` picks on ``est`` at each of its
    ``L`` knob values (the run's sweep), scored by the data's outcomes ``Y`` and costs ``cost``."""
    from router_ml.evaluation.sweeps import knob_values

    rows = np.arange(len(Y))
    knobs = knob_values(ctx.utility, policy, est, ref_cost)
    S, C = np.empty((len(Y), len(knobs))), np.empty((len(Y), len(knobs)))
    for i, value in enumerate(knobs):
        choice = policy.with_knob(value).choose(est)
        S[:, i], C[:, i] = Y[rows, choice], cost[rows, choice]
    return S, C


def _fit_guard(
    ctx: _Context,
    hcfg: Mapping[str, Any],
    p_tr: pd.DataFrame,
    Y_tr: np.ndarray,
    X_tr: np.ndarray,
    H_tr: np.ndarray,
    t_tr: list[str],
    fitted: tuple[Any, Any, Any],
    X_va: np.ndarray,
    t_va: list[str],
    q_va: np.ndarray | None,
    est_va: Any,
    mode: str | None = None,
    oof_cache: dict[bytes, np.ndarray] | None = None,
    C_tr: np.ndarray | None = None,
) -> tuple[Any, ...]:
    """``(head, cal, policy, guard, novelty of the validation prompts, fit summary)``: a
    :class:`~router_ml.predictors.guard.NoveltyGuard` fitted on the fold's training part by
    family-grouped CV of the same head (``fitted`` = its head, calibrator, policy), and the utility
    policy refitted on the guarded validation estimates. ``mode`` overrides the guard's params;
    ``oof_cache`` keeps the head's out-of-fold predictions for the next mode's guard (same folds);
    ``C_tr`` the training prompts' $ per model (the guard's ties at the top are broken over the
    utility policy's frontier)."""
    from router_ml.data.taxonomy import task_ids_of
    from router_ml.predictors.guard import NoveltyGuard
    from router_ml.predictors.tuning import fit_head, predict_head

    head, cal, policy = fitted
    tid = task_ids_of(p_tr[hcfg.get("task_key", "task")])
    params = dict(hcfg.get("params") or {})

    cache = {} if oof_cache is None else oof_cache
    mixes_tasks = hcfg["name"] == "taskmix" or any(
        m.get("name") == "taskmix" for m in params.get("members") or () if hcfg["name"] == "ensemble"
    )

    def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        key = np.asarray(tr, np.int64).tobytes() + b"|" + np.asarray(te, np.int64).tobytes()
        if key not in cache and len(np.unique(tid[tr])) < 2 and mixes_tasks:
            # one task label left (ZeroEval's 3 tasks less the outer and the inner held-out one): a
            # task mixture over one task is that task's per-model mean, which the classifier cannot fit
            # (an ensemble with a taskmix member falls back the same way)
            cache[key] = np.tile(np.nan_to_num(np.nanmean(Y_tr[tr], axis=0)), (len(te), 1))
        if key not in cache:
            h = fit_head(hcfg["name"], params, H_tr[tr], Y_tr[tr], tid[tr], [t_tr[i] for i in tr])
            cache[key] = predict_head(h, H_tr[te], [t_tr[i] for i in te])
        return cache[key]

    families = p_tr[ctx.family_by].astype(str).to_numpy()
    gparams = {"seed": ctx.seed, **(ctx.guard.get("params") or {})}
    if mode is not None:
        gparams["mode"] = mode
    calibrate = cal.transform if cal is not None else None  # intervals on the scale they are served on
    g = NoveltyGuard(**gparams).fit(
        X_tr, Y_tr, families, fit_predict, texts=t_tr, calibrate=calibrate, cost=C_tr
    )
    info = {
        "fitted_mode": g.fitted_mode,
        "shrink": g.shrink_.tolist(),
        "spread_risk": g.spread_risk_.tolist(),
        "margin": g.margin_.tolist(),
        "cv_auroc": g.cv_auroc_,
        "cv_gain": g.cv_gain_.tolist(),
        "cv_trust_auroc": g.cv_trust_auroc_,
        "trust_tau": float(g.trust_tau_[0]),
    }
    nov_va = np.zeros(0)
    policy = copy.deepcopy(policy)
    policy.risk = float(ctx.guard.get("risk", getattr(policy, "risk", 0.0)))
    if est_va is not None and q_va is not None:  # validation prompts: training families, never trained on
        gd = g.transform(X_va, q_va, texts=t_va)
        nov_va = gd.novelty
        policy = policy.fit(dataclasses.replace(est_va, quality=gd.quality, quality_lower=gd.lower))
    return head, cal, policy, g, nov_va, info


def guard_summary(parts: list[FoldScores], models: list[str], coverage: float) -> dict[str, Any]:
    """Per guarded head, over the original rendering's folds: the novelty AUROC at telling test
    prompts from the folds' in-distribution validation prompts (pooled and per fold), the mean
    test novelty, each model's interval coverage on the test prompts against ``coverage``, and
    the shrinkage fitted per fold."""
    from sklearn.metrics import roc_auc_score

    orig = [p for p in parts if p.rendering == parts[0].rendering]
    out: dict[str, Any] = {}
    for h in orig[0].novelty if orig else []:
        te = np.concatenate([p.novelty[h] for p in orig])
        va = np.concatenate([p.novelty_id[h] for p in orig])
        per_fold = {
            p.fold: float(roc_auc_score(np.r_[np.zeros(len(p.novelty_id[h])), np.ones(len(p.novelty[h]))],
                                        np.r_[p.novelty_id[h], p.novelty[h]]))
            for p in orig
            if len(p.novelty_id[h]) and len(p.novelty[h])
        }  # fmt: skip
        cov = np.nanmean(np.vstack([p.covered[h] for p in orig]), axis=0)
        trust = _trust_summary(orig, h)
        out[h] = {
            **trust,
            "novelty_auroc": float(roc_auc_score(np.r_[np.zeros(len(va)), np.ones(len(te))], np.r_[va, te]))
            if len(va) and len(te)
            else float("nan"),
            "novelty_auroc_per_fold": per_fold,
            "novelty_test_mean": float(te.mean()),
            "novelty_id_mean": float(va.mean()) if len(va) else float("nan"),
            "coverage_nominal": coverage,
            "coverage": dict(zip(models, cov.tolist(), strict=True)),
            "coverage_worst_gap_pts": float(100 * np.max(np.abs(cov - coverage))),
            "coverage_mean_gap_pts": float(100 * np.mean(np.abs(cov - coverage))),
            "fits": {p.fold: p.guard_fit[h] for p in orig},
        }
    return out


def _trust_summary(parts: list[FoldScores], h: str) -> dict[str, Any]:
    """For a guard with a deferral model (``mode="trust"``): on the held-out prompts where the head's
    own pick left the best single model, the AUROC of its predicted gain (negated) at telling where
    the pick scored below the best single model, that share, and how often the pick was kept."""
    from sklearn.metrics import roc_auc_score

    if not parts or h not in parts[0].trust:
        return {}
    base = h.split("+")[0]
    moved = np.concatenate([p.moved[h] for p in parts])
    t = np.concatenate([p.trust[h] for p in parts])[moved]
    worse = np.concatenate([p.routed[base] - p.Y[:, p.best] for p in parts])[moved] < 0
    tau = np.concatenate([np.full(len(p.moved[h]), p.guard_fit[h]["trust_tau"]) for p in parts])[moved]
    return {
        "trust_auroc_head_worse": float(roc_auc_score(worse, -t))
        if 0 < worse.sum() < len(worse)
        else float("nan"),
        "trust_moved_share": float(moved.mean()),
        "trust_head_worse_share": float(worse.mean()) if len(worse) else float("nan"),
        "trust_kept_share": float((t > tau).mean()) if len(t) else float("nan"),
    }


# ---- the run ---------------------------------------------------------------------------------
def _embed_and_tasks(
    cfg: Mapping[str, Any], texts: list[str], seed: int, head_layers: Sequence[int] = ()
) -> tuple[dict[str, np.ndarray], dict[str, str], tuple[int, ...], int]:
    """Features of ``texts`` (on-disk cache): the embedding, then the pooled states of the task
    head's and ``head_layers`` (the quality heads') layers; their task types predicted by a task
    head fitted on the project's labelled prompts only (none of them is a routing-table prompt);
    the layers the features hold; the embedding's width."""
    from router_ml.data.taxonomy import TASK_TYPES
    from router_ml.embeddings import CachedEncoder, build_encoder
    from router_ml.embeddings.base import layer_columns
    from router_ml.predictors import TaskClassifier
    from router_ml.training import task_training_data

    encoder = build_encoder(cfg["encoder"])
    cached = CachedEncoder(encoder, cache_dir=cfg.get("cache_dir"))
    params = dict((cfg.get("task_head") or {}).get("params") or {})
    layers = tuple(params.get("layers") or ())
    if layers and not hasattr(encoder, "encode_layers"):
        params["layers"], layers = [], ()  # a static encoder has no layer states
    have = tuple(sorted(set(layers) | set(head_layers)))
    if head_layers and not hasattr(encoder, "encode_layers"):
        raise ValueError(
            f"shift: a head reads encoder layers {list(head_layers)}; encoder {encoder.id!r} has none"
        )
    wide = cached.encode_layers(texts, have, show_progress=True) if have else cached.encode(texts)
    emb = dict(zip(texts, wide, strict=True))
    feats = wide[:, layer_columns(have, layers, encoder.dim)] if have else wide
    held = pd.DataFrame({"prompt": texts})
    tcfg = {**(cfg.get("task_data") or {}), "routing_table": False}
    task_train, _ = task_training_data({"train": held.iloc[:0], "test": held}, tcfg, seed)
    tt = list(task_train["prompt"])
    X_task = cached.encode_layers(tt, layers) if layers else cached.encode(tt)
    head = TaskClassifier(labels=list(TASK_TYPES), **params).fit(X_task, list(task_train["task"]), texts=tt)
    pred = head.predict(feats, texts=texts)
    return emb, dict(zip(texts, (str(p) for p in pred), strict=True)), have, int(encoder.dim)


def _folds(
    cfg: Mapping[str, Any], table: pd.DataFrame, seed: int, family_by: str | None = None
) -> list[tuple[str, pd.DataFrame, dict[str, pd.DataFrame]]]:
    """``[(fold, train table, {rendering: test table})]`` for the run's shift mode; ``family_by``:
    the column to hold out by (default ``shift.family_by``; :func:`group_families`' column)."""
    from router_ml.evaluation.renderings import llmrouter_choices, render_table

    s = cfg["shift"]
    mode = s["name"]
    family_by = family_by or s.get("family_by", "source_task")
    if mode == "leave_one_family_out":
        fams = s.get("families")
        return [(f, tr, {"original": te}) for f, tr, te in lofo_folds(table, family_by, fams)]
    folds = kfold_folds(table, int(s.get("folds", 5)), seed)
    if mode == "in_distribution":
        return [(f, tr, {"original": te}) for f, tr, te in folds]
    if mode == "format":
        choices = llmrouter_choices(table)
        train_r = s.get("train_rendering", "original")
        renders = list(s.get("renderings") or ["original"])
        return [
            (f, render_table(tr, train_r, choices), {r: render_table(te, r, choices) for r in renders})
            for f, tr, te in folds
        ]
    raise ValueError(f"shift: unknown mode {mode!r}; known: none, {', '.join(MODES)}")


def evaluate_shift(cfg: Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Run the shift evaluation of ``cfg.shift`` and write ``shift.json``, ``shift.md`` and
    ``shift_prompts.parquet`` (per prompt: fold, rendering, family, best single and routed scores)
    into ``run_dir``; returns the summary (see :func:`router_ml.evaluation.shift_report.summarise`)."""
    from tqdm.auto import tqdm

    from router_ml.data.loading import load_routing_data
    from router_ml.evaluation.estimates import build_layer
    from router_ml.evaluation.shift_report import markdown, prompt_frame, summarise
    from router_ml.metrics import json_safe

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    s = dict(cfg["shift"])
    seed = int((cfg.get("seeds") or [cfg.get("seed", 0)])[0])
    family_by = s.get("family_by", "source_task")
    table = load_routing_data(cfg["data"], seed=seed)
    if s.get("family_groups"):
        table, family_by = group_families(table, family_by, s["family_groups"])
    table, dropped = shift_table(table, family_by, float(s.get("min_model_coverage", 0.98)))
    models = sorted(table["model"].unique())
    folds = _folds(cfg, table, seed, family_by)
    texts = sorted(
        {t for _, tr, tests in folds for df in (tr, *tests.values()) for t in df["prompt"].unique()}
    )
    t1 = time.perf_counter()
    heads = shift_heads(cfg)
    from router_ml.training import calibration_folds, guard_layers

    want = sorted({k for h in heads.values() for k in head_layers(h)} | set(guard_layers(s.get("guard"))))
    emb, tasks, have, dim = _embed_and_tasks(cfg, texts, seed, want)
    embed_s = time.perf_counter() - t1
    ctx = _Context(
        models=models,
        emb=emb,
        tasks=tasks,
        layer=build_layer(cfg, models),
        heads=heads,
        calibrator=(cfg.get("calibrator") or {}).get("name", "none"),
        calibration_folds=calibration_folds(cfg),
        utility=dict(
            (cfg.get("policies") or {}).get("utility") or {"name": "utility", "sweep": {"kind": "lam"}}
        ),
        family_by=family_by,
        val_size=float(s.get("val_size", 0.1)),
        seed=seed,
        guard=dict(s.get("guard") or {}),
        layers=have,
        dim=dim,
    )
    parts: list[FoldScores] = []
    for fold, train, tests in tqdm(folds, desc=f"shift {s['name']} {cfg['data'].get('name')}"):
        parts.extend(fold_scores(ctx, fold, train, tests))
    summary = summarise(parts, models, int(s.get("n_boot", 2000)), seed)
    if ctx.guard.get("heads"):
        from router_ml.predictors.guard import NoveltyGuard

        nominal = float((ctx.guard.get("params") or {}).get("coverage", NoveltyGuard().coverage))
        summary["guard"] = guard_summary(parts, models, nominal)
    summary.update(
        mode=s["name"],
        data=cfg["data"].get("name"),
        family_by=family_by,
        models=models,
        dropped_models=dropped,
        n_prompts=int(table["prompt_id"].nunique()),
        seed=seed,
        folds=[f for f, _, _ in folds],
        heads={h: {"name": c["name"], "params": c.get("params") or {}} for h, c in ctx.heads.items()},
        targets=dict(s.get("targets") or {}),
        time={"total_s": time.perf_counter() - t0, "embed_s": embed_s},
    )
    from router_ml.evaluation.shift_report import check_targets

    check_targets(summary)
    (run_dir / "shift.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    (run_dir / "shift.md").write_text(markdown(summary))
    prompt_frame(parts, models).to_parquet(run_dir / "shift_prompts.parquet", index=False)
    return summary
