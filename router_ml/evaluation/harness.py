"""``evaluate(cfg, run_dir)``: quality against spend for every policy, on held-out prompts.

Per seed: load the routing table -> the same leak-free split as training -> a router (trained here,
or loaded from ``cfg.checkpoint``, whose recorded data and split are rebuilt and checked) plus the
comparison heads (kNN by default) fitted on the same training part -> estimates for the test prompts
(predicted quality and task, expected $ from the cost model, expected latency from the latency
model) -> every policy swept over its knob. A point is billed with the data's own cost of the chosen
call (RouterBench's measured $, list prices x tokens elsewhere) and scored with the data's observed
score; a policy never sees either before it decides.

Written to ``run_dir``: ``metrics.json`` (per seed and mean with 95% CI over seeds),
``frontier.parquet`` (one row per seed x router x knob: cost, quality, latency, strong share...),
``per_task.parquet``, ``pacing.parquet`` and PNG plots (see :mod:`router_ml.evaluation.plots`).

Latency in the evaluation is modelled, not measured: the data sets carry no per-call latency (the
simulated one excepted), so a call's completion time is the latency model's TTFT + the call's
output tokens / tokens-per-second; SLO attainment is reported on that basis.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from router_ml.data.schema import table_hash, wide_column
from router_ml.decision.base import Estimates
from router_ml.decision.policies import SLO_PRESETS, Policy, build_policy, replay
from router_ml.evaluation import frontier as fr
from router_ml.training import FittedRouter, _as_dict, fit_router, split_data

log = logging.getLogger(__name__)


# ---- estimates -------------------------------------------------------------------------------
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
    est = layer.estimates(prompts["prompt"].tolist(), quality, models, tasks, observed=Y)
    est.feasible = ~np.isnan(Y)
    cost = wide_column(table_split, prompts, models, "cost_usd")
    if np.isnan(cost[est.feasible]).any():
        raise ValueError(
            f"split {split}: {int(np.isnan(cost[est.feasible]).sum())} observed calls have no cost "
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


# ---- sweeps ----------------------------------------------------------------------------------
def knob_values(policy_cfg: Mapping[str, Any], policy: Policy, est: Estimates, ref_cost: float) -> list[Any]:
    """The knob values a policy is swept over (``sweep`` in its conf/policy entry)."""
    sweep = dict(policy_cfg.get("sweep") or {})
    if "values" in sweep:
        return list(sweep["values"])
    kind = sweep.get("kind")
    n = int(sweep.get("num", 25))
    if kind == "lam":  # willingness to pay, relative to the best single model's cost per request
        lo, hi = float(sweep.get("lo", 1e-3)), float(sweep.get("hi", 1e3))
        return [0.0, *(np.geomspace(lo, hi, n) / max(ref_cost, 1e-12)).tolist()]
    if kind == "budget_fraction":  # budget as shares of the best single model's spend on the set
        return [float(f) * ref_cost * len(est) for f in sweep.get("fractions", [0.1, 0.25, 0.5, 0.75, 1.0])]
    if kind == "advantage_quantiles":
        adv = policy.advantage(est)  # type: ignore[attr-defined]
        return [*np.quantile(adv, np.linspace(0, 1, n)).tolist(), float(np.max(adv)) + 1e-9]
    if kind == "linspace":
        return np.linspace(float(sweep.get("lo", 0.0)), float(sweep.get("hi", 1.0)), n).tolist()
    if kind:
        raise ValueError(f"policy {policy.name}: unknown sweep kind {kind!r}")
    return [None]


def _point(
    choice: np.ndarray, refused: np.ndarray, est: Estimates, cost: np.ndarray, latency: np.ndarray, slo: tuple
) -> dict[str, float]:
    n = len(choice)
    rows = np.arange(n)
    ok = choice >= 0
    j = np.where(ok, choice, 0)
    score = np.where(ok, est.observed[rows, j], 0.0)
    score = np.where(np.isnan(score), 0.0, score)  # an unobserved pick scores 0 (cannot happen: feasible)
    spend = np.where(ok, cost[rows, j], 0.0)
    lat = np.where(ok, latency[rows, j], np.nan)
    ttft = np.where(ok, est.ttft[rows, j], np.nan)
    meets = (ttft <= slo[0]) & (lat <= slo[1])
    return {
        "quality": float(score.mean()),
        "cost": float(spend.sum()),
        "cost_per_1k": float(spend.sum() / n * 1000),
        "latency_mean_s": float(np.nanmean(lat)) if ok.any() else math.nan,
        "latency_p95_s": float(np.nanquantile(lat, 0.95)) if ok.any() else math.nan,
        "slo_attainment": float(np.mean(meets & ok)),
        "refused": float(refused.mean()),
    }


def sweep_policy(
    name: str,
    policy_cfg: Mapping[str, Any],
    est: Estimates,
    cost: np.ndarray,
    latency: np.ndarray,
    ref_cost: float,
    slo: tuple[float, float],
    fit_est: Estimates,
    seed: int,
    pair: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One frontier row per knob value. ``pair`` = (strong, weak) model indices: rows record the share
    of strong calls and whether every call went to the pair (then APGR/CPT apply)."""
    params = {k: v for k, v in policy_cfg.items() if k not in ("sweep",)}
    if params.get("name") == "random":
        params.setdefault("seed", seed)
    if params.get("name") == "cost_aware":
        params["horizon"] = len(est)
    if params.get("name") in ("threshold", "random") and pair is not None and not params.get("uniform"):
        # the comparison's strong/weak pair, unless the policy config names its own
        params["strong"] = params.get("strong") or est.models[pair[0]]
        params["weak"] = params.get("weak") or est.models[pair[1]]
    base = build_policy(params).fit(fit_est)
    rows = []
    for value in knob_values(policy_cfg, base, est, ref_cost):
        policy = base if value is None else base.with_knob(value)
        if isinstance(policy, type(base)) and hasattr(policy, "_rng"):
            policy._rng = np.random.default_rng(seed)  # every knob value gets the same draws
        choice, refused = replay(policy, est, cost)
        p_slo = slo
        if hasattr(policy, "limits"):
            lim = policy.limits()
            p_slo = (lim[0] if lim[0] is not None else slo[0], lim[1] if lim[1] is not None else slo[1])
        row = {"router": name, "policy": base.name, "knob": base.knob, "knob_value": value}
        row.update(_point(choice, refused, est, cost, latency, p_slo))
        row["slo_ttft_s"], row["slo_latency_s"] = p_slo
        if pair is not None:
            row["strong_share"] = float(np.mean(choice == pair[0]))
            row["pair_only"] = bool(np.isin(choice, pair).all())
        if base.stateful and value is not None:
            budget = float(value)
            spent = row["cost"]
            row["budget_usd"] = budget
            row["spend_over_budget"] = spent / budget if budget > 0 else math.nan
        rows.append(row)
    return rows


def pacing_replay(
    pcfg: Mapping[str, Any], est: Estimates, cost: np.ndarray, fit_est: Estimates, ref_cost: float, seed: int
) -> dict[str, float]:
    """Budget pacing over a long stream: ``requests`` draws (with replacement, seeded) from the
    test prompts; ``budget_fraction`` of what the best single model would cost on that stream."""
    from router_ml.decision.policies import CostAwarePolicy

    n = int(pcfg.get("requests", 10_000))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(est), size=n)
    stream = est.take(idx)
    actual = cost[idx]
    budget = float(pcfg.get("budget_fraction", 0.3)) * ref_cost * n
    policy = CostAwarePolicy(budget_usd=budget, horizon=n, eta=float(pcfg.get("eta", 0.05))).fit(fit_est)
    t0 = time.perf_counter()
    choice, refused = replay(policy, stream, actual)
    elapsed = time.perf_counter() - t0
    ok = choice >= 0
    spend = np.where(ok, actual[np.arange(n), np.where(ok, choice, 0)], 0.0)
    cum = np.cumsum(spend)
    q = np.where(ok, stream.observed[np.arange(n), np.where(ok, choice, 0)], 0.0)
    return {
        "requests": float(n),
        "budget_usd": budget,
        "spent_usd": float(cum[-1]),
        "spend_vs_target": float(cum[-1] / budget),
        "max_cumulative_over_cap_usd": float(max(0.0, (cum - policy.cap).max())),
        "never_over_cap": float((cum <= policy.cap + 1e-12).all()),
        "refused_share": float(refused.mean()),
        "quality": float(np.nan_to_num(q).mean()),
        "decisions_per_s": n / elapsed if elapsed > 0 else math.nan,
        "spent_at_half_stream": float(cum[n // 2 - 1] / budget),
    }


# ---- metrics over a comparison ---------------------------------------------------------------
def frontier_metrics(fdf: pd.DataFrame, best: str, oracle_q: float) -> dict[str, float]:
    """AIQ, quality at the best single model's cost, cost to reach 95%/100% of its quality, gap
    closed; and at each router's operating point nearest the best single model's cost (its best
    sweep point that costs no more): quality, $ per 1k requests, mean latency, SLO attainment and,
    for budgeted policies, the largest share of a budget spent."""
    singles = fdf[fdf["policy"] == "single"]
    b = singles[singles["router"] == f"single:{best}"].iloc[0]
    c_lo, c_hi = float(fdf["cost"].min()), float(fdf["cost"].max())
    out: dict[str, float] = {
        "best_single/quality": float(b["quality"]),
        "best_single/cost": float(b["cost"]),
        "best_single/cost_per_1k": float(b["cost_per_1k"]),
        "best_single/slo_attainment": float(b["slo_attainment"]),
        "oracle/quality": oracle_q,
    }
    for r, g in fdf[fdf["policy"] != "single"].groupby("router", sort=False):
        under = g[g["cost"] <= float(b["cost"]) * (1 + 1e-9)]
        op = (under if len(under) else g.nsmallest(1, "cost")).sort_values("quality").iloc[-1]
        for col in ("quality", "cost_per_1k", "latency_mean_s", "slo_attainment", "refused"):
            out[f"{r}/op_{col}"] = float(op[col])
        if "spend_over_budget" in g and g["spend_over_budget"].notna().any():
            out[f"{r}/max_spend_over_budget"] = float(g["spend_over_budget"].max())
    zc, zq = fr.zero_router(singles["cost"].to_numpy(), singles["quality"].to_numpy())
    routers = {r: g for r, g in fdf.groupby("router", sort=False) if not r.startswith("single:")}
    routers["zero"] = pd.DataFrame({"cost": zc, "quality": zq})
    for r, g in routers.items():
        c, q = g["cost"].to_numpy(), g["quality"].to_numpy()
        out[f"{r}/aiq"] = fr.aiq(c, q, (c_lo, c_hi))
        hc, hq = fr.ndch(c, q)
        q_at = float(fr.hull_quality(hc, hq, b["cost"])) if len(hc) else math.nan
        out[f"{r}/quality_at_best_cost"] = q_at
        out[f"{r}/gap_closed_at_best_cost"] = (
            (q_at - b["quality"]) / (oracle_q - b["quality"]) if oracle_q > b["quality"] else math.nan
        )
        for share in (0.95, 1.0):
            cost = fr.cost_to_reach(c, q, share * float(b["quality"]))
            out[f"{r}/cost_share_to_{int(share * 100)}pct_best"] = cost / float(b["cost"])
        out[f"{r}/max_quality"] = float(q.max())
    return out


def pair_metrics(fdf: pd.DataFrame, q_weak: float, q_strong: float) -> dict[str, float]:
    """APGR and CPT(20/50/80%) of every router whose rows carry a strong-call share."""
    out: dict[str, float] = {}
    if "strong_share" not in fdf:
        return out
    for r, g in fdf.dropna(subset=["strong_share"]).groupby("router", sort=False):
        if not g["pair_only"].astype(bool).all():
            continue  # some calls went to a third model: not a strong/weak router
        share, q = g["strong_share"].to_numpy(), g["quality"].to_numpy()
        out[f"{r}/apgr"] = fr.apgr(share, q, q_weak, q_strong)
        for p in (0.2, 0.5, 0.8):
            out[f"{r}/cpt{int(p * 100)}"] = fr.cpt(share, q, q_weak, q_strong, p)
    return out


# ---- one seed --------------------------------------------------------------------------------
def load_checkpoint_router(cfg: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    from router_ml.router import LearnedRouter

    router = LearnedRouter.from_pretrained(cfg["checkpoint"])
    training = router.metadata.get("training", {})
    if "data_config" not in training or "split" not in training:
        raise ValueError(
            f"checkpoint {cfg['checkpoint']} does not record its data and split; retrain it with this version"
        )
    return router, training


def complete_prompts(table: pd.DataFrame) -> pd.DataFrame:
    """Only prompts with an outcome for every model: every router and single model is then scored
    on the same prompts (a single model cannot be billed or scored where it never ran)."""
    n_models = table["model"].nunique()
    counts = table.groupby("prompt_id")["model"].nunique()
    keep = counts.index[counts == n_models]
    if len(keep) < len(counts):
        log.info(
            "evaluating on %d of %d prompts: the others lack some model's outcome", len(keep), len(counts)
        )
    return table[table["prompt_id"].isin(keep)]


def evaluate_seed(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    from router_ml.data.loading import load_routing_data
    from router_ml.predictors.calibration import reliability_curve

    encoder = task_head = None
    run_cfg = dict(cfg)
    if cfg.get("checkpoint"):
        router, training = load_checkpoint_router(cfg)
        run_cfg["data"], run_cfg["split"], seed = (
            training["data_config"],
            training["split"],
            int(training["seed"]),
        )
        encoder, task_head = router.encoder, router.task_head
    table = load_routing_data(run_cfg["data"], seed=seed)
    if cfg.get("checkpoint") and table_hash(table) != training["data_hash"]:
        raise ValueError(
            f"checkpoint {cfg['checkpoint']} was trained on other data (hash {training['data_hash']}, "
            f"now {table_hash(table)}): its held-out split cannot be rebuilt"
        )
    table = complete_prompts(table)
    splits = split_data(table, run_cfg.get("split", {}), seed)
    t0 = time.perf_counter()
    fitted = fit_router(run_cfg, table, splits, seed, encoder=encoder, task_head=task_head)
    if cfg.get("checkpoint"):
        fitted.router = router
    fit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    layer = build_layer(run_cfg, fitted.models)
    models = fitted.models
    cal_name = (run_cfg.get("calibrator") or {}).get("name", "none")
    heads = {"learned": None}
    for hname, hcfg in (cfg.get("compare_heads") or {}).items():
        heads[hname] = fitted.fit_head(hcfg, cal_name, seed)

    def predict(split: str) -> tuple[dict[str, np.ndarray], list[str]]:
        prompts = fitted.wide[split][0]["prompt"]
        X = fitted.X_of(prompts)
        tasks = fitted.router.task_head.predict(X, texts=list(prompts))
        preds = {}
        for hname, head in heads.items():
            preds[hname] = fitted.router._quality_from_embeddings(X) if head is None else head.predict(X)
        return preds, list(tasks)

    slo = SLO_PRESETS[cfg.get("slo", "interactive")][:2]
    out_rows: list[dict[str, Any]] = []
    per_task: list[pd.DataFrame] = []
    result: dict[str, Any] = {"seed": seed, "metrics": {}, "pacing": {}}
    for split in [s for s in ("test", "ood") if s in fitted.wide and len(fitted.wide[s][0])]:
        preds, tasks = predict(split)
        val_preds, val_tasks = predict("val") if len(fitted.wide["val"][0]) else predict("train")
        ests = {}
        for hname in heads:
            est, cost, latency = split_estimates(layer, fitted, split, preds[hname], tasks, splits[split])
            fit_split = "val" if len(fitted.wide["val"][0]) else "train"
            fit_est = split_estimates(
                layer, fitted, fit_split, val_preds[hname], val_tasks, splits[fit_split]
            )[0]
            ests[hname] = (est, fit_est)
        est0 = ests["learned"][0]
        Y = est0.observed
        n = len(Y)
        # single models (the oracle and random are policies / columns below)
        for j, m in enumerate(models):
            choice = np.full(n, j)
            row = {"router": f"single:{m}", "policy": "single", "knob": None, "knob_value": None}
            row.update(_point(choice, np.zeros(n, bool), est0, cost, latency, slo))
            out_rows.append({"split": split, **row})
        best = models[fitted.best]
        weak = int(np.argmin(np.nanmean(cost, axis=0)))  # APGR/CPT pair: best single vs cheapest
        pair = (fitted.best, weak) if weak != fitted.best else None
        ref_cost = float(np.nanmean(cost[:, fitted.best]))
        oracle_q = float(np.nanmax(np.where(np.isnan(Y), -np.inf, Y), axis=1).mean())
        for pname, pcfg in (cfg.get("policies") or {}).items():
            heads_for = (
                pcfg.get("heads", ["learned"])
                if pcfg.get("name") not in ("oracle", "random")
                else ["learned"]
            )
            for hname in heads_for:
                if hname not in ests:
                    continue
                est, fit_est = ests[hname]
                label = pname if hname == "learned" else f"{pname}[{hname}]"
                pc = {k: v for k, v in pcfg.items() if k != "heads"}
                rows = sweep_policy(label, pc, est, cost, latency, ref_cost, slo, fit_est, seed, pair)
                out_rows.extend({"split": split, **r} for r in rows)
        fdf = pd.DataFrame([r for r in out_rows if r["split"] == split])
        metrics = frontier_metrics(fdf, best, oracle_q)
        if pair is not None and "strong_share" in fdf:
            q_s, q_w = float(np.nanmean(Y[:, fitted.best])), float(np.nanmean(Y[:, weak]))
            metrics.update(pair_metrics(fdf, q_w, q_s))
            metrics["pair/strong"], metrics["pair/weak"] = best, models[weak]
        metrics["n_prompts"] = float(n)
        metrics["random/quality"] = float(np.nanmean(Y, axis=1).mean())
        # calibration of the learned head on this split
        rel = reliability_curve(preds["learned"], Y)
        result.setdefault("reliability", {})[split] = {
            "confidence": rel["mean_pred"].tolist(),
            "accuracy": rel["mean_target"].tolist(),
            "count": rel["count"].astype(int).tolist(),
        }
        # per-task breakdown at the best single model's cost (the utility sweep's point closest under it)
        true_tasks = fitted.wide[split][0]["task"].to_numpy()
        per_task.append(_per_task(split, fdf, true_tasks, cost, models, fitted.best, ests))
        result["metrics"][split] = metrics
        if cfg.get("pacing") and split == "test":
            est_l, fit_l = ests["learned"]
            result["pacing"] = pacing_replay(cfg["pacing"], est_l, cost, fit_l, ref_cost, seed)
    result["frontier"] = pd.DataFrame(out_rows).assign(seed=seed)
    result["per_task"] = (
        pd.concat(per_task, ignore_index=True).assign(seed=seed) if per_task else pd.DataFrame()
    )
    result["time"] = {"fit_s": fit_s, "evaluate_s": time.perf_counter() - t0}
    result["router"] = fitted.router
    return result


def _per_task(
    split: str,
    fdf: pd.DataFrame,
    true_tasks: np.ndarray,
    cost: np.ndarray,
    models: list[str],
    best: int,
    ests: Mapping[str, tuple[Estimates, Estimates]],
) -> pd.DataFrame:
    """Quality and cost per TRUE task type: the best single model, the oracle and the utility policy
    at the best single model's cost (its most accurate sweep point that does not cost more)."""
    from router_ml.decision.policies import OraclePolicy, UtilityPolicy

    est = ests["learned"][0]
    picks: dict[str, np.ndarray] = {
        "best single": np.full(len(est), best),
        "oracle": OraclePolicy().choose(est),
    }
    b_cost = float(fdf.loc[fdf["router"] == f"single:{models[best]}", "cost"].iloc[0])
    for hname, (e, _) in ests.items():
        label = "utility" if hname == "learned" else f"utility[{hname}]"
        g = fdf[(fdf["router"] == label) & (fdf["cost"] <= b_cost * 1.0001)]
        if len(g):
            lam = float(g.sort_values("quality").iloc[-1]["knob_value"])
            picks[f"{label} @ best-single cost"] = UtilityPolicy(lam=lam).choose(e)
    rows = []
    idx = np.arange(len(est))
    for label, choice in picks.items():
        s, c = est.observed[idx, choice], cost[idx, choice]
        for task in sorted(set(true_tasks)):
            mask = true_tasks == task
            rows.append(
                {
                    "split": split,
                    "router": label,
                    "task": task,
                    "n": int(mask.sum()),
                    "quality": float(np.nanmean(s[mask])),
                    "cost_per_1k": float(c[mask].mean() * 1000),
                }
            )
    return pd.DataFrame(rows)


# ---- entry point -----------------------------------------------------------------------------
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


def _aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for m in per_seed for k, v in m.items() if isinstance(v, float)})
    out = {}
    for k in keys:
        mean, lo, hi = fr.mean_ci([m.get(k, math.nan) for m in per_seed])
        out[k] = {"mean": mean, "ci_lo": lo, "ci_hi": hi}
    return out


def evaluate(cfg: Any, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the evaluation for every seed in ``cfg.seeds``; write and return the summary."""
    from router_ml.evaluation.plots import plot_run

    cfg = _as_dict(cfg)
    run_dir = Path(run_dir or cfg.get("run_dir") or ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in (cfg.get("seeds") or [cfg.get("seed", 0)])]
    if cfg.get("checkpoint"):
        seeds = seeds[:1]  # a checkpoint is one trained router: one split, one seed
    results = []
    t0 = time.perf_counter()
    for seed in seeds:
        log.info("evaluating seed %d", seed)
        results.append(evaluate_seed(cfg, seed))
    frontier = pd.concat([r["frontier"] for r in results], ignore_index=True)
    per_task = pd.concat([r["per_task"] for r in results], ignore_index=True)
    summary: dict[str, Any] = {"seeds": seeds, "splits": {}, "pacing": {}, "per_seed": {}}
    for split in sorted({s for r in results for s in r["metrics"]}):
        per_seed = [r["metrics"][split] for r in results if split in r["metrics"]]
        summary["splits"][split] = _aggregate(per_seed)
        summary["per_seed"][split] = per_seed
        summary["pair"] = {k: v for k, v in per_seed[0].items() if k.startswith("pair/")}
    if any(r["pacing"] for r in results):
        summary["pacing"] = _aggregate([r["pacing"] for r in results if r["pacing"]])
    summary["reliability"] = results[0].get("reliability", {})
    summary["time"] = {
        "total_s": time.perf_counter() - t0,
        "per_seed": [r["time"] for r in results],
    }
    frontier["knob_num"] = pd.to_numeric(frontier["knob_value"], errors="coerce")
    frontier["knob_value"] = (
        frontier["knob_value"].astype(object).map(lambda v: None if v is None else str(v))
    )
    frontier.to_parquet(run_dir / "frontier.parquet", index=False)
    per_task.to_parquet(run_dir / "per_task.parquet", index=False)
    (run_dir / "metrics.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    plot_run(run_dir)
    return summary
