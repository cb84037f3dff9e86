"""``evaluate(cfg, run_dir)``: quality against spend for every policy, on held-out prompts.

Per seed: load the routing table -> the same leak-free split as training -> a router (trained here,
or loaded from ``cfg.checkpoint``, whose recorded data and split are rebuilt and checked) plus the
comparison heads (kNN by default) fitted on the same training part -> estimates for the test prompts
(predicted quality and task, expected $ from the cost model, expected latency from the latency
model) -> every policy swept over its knob. A point is billed with the data's own cost of the chosen
call (RouterBench's measured $, list prices x tokens elsewhere) and scored with the data's observed
score; a policy never sees either before it decides.

The steps live in :mod:`~router_ml.evaluation.estimates` (pool, decision layer, estimates),
:mod:`~router_ml.evaluation.sweeps` (knob sweeps), :mod:`~router_ml.evaluation.pacing` (budget
pacing replay) and :mod:`~router_ml.evaluation.comparison` (frontier metrics, APGR/CPT, per task);
this module runs them per seed and writes the run folder.

Written to ``run_dir``: ``metrics.json`` (per seed and mean with 95% CI over seeds),
``frontier.parquet`` (one row per seed x router x knob: cost, quality, latency, strong share...),
``per_task.parquet``, ``pacing.parquet`` and PNG plots (see :mod:`router_ml.evaluation.plots`).

Latency in the evaluation is modelled, not measured: the data sets carry no per-call latency (the
simulated one excepted), so a call's completion time is the latency model's TTFT + the call's
output tokens / tokens-per-second; SLO attainment is reported on that basis.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from router_ml.data.schema import table_hash
from router_ml.decision.policies import SLO_PRESETS
from router_ml.evaluation import frontier as fr
from router_ml.evaluation.comparison import _per_task, frontier_metrics, pair_metrics
from router_ml.evaluation.estimates import build_layer, build_pool, split_estimates
from router_ml.evaluation.pacing import pacing_replay
from router_ml.evaluation.sweeps import _point, knob_values, sweep_policy
from router_ml.metrics import json_safe
from router_ml.predictors.tuning import predict_head
from router_ml.training import _as_dict, calibration_folds, fit_router, split_data

log = logging.getLogger(__name__)

__all__ = [
    "build_layer",
    "build_pool",
    "complete_prompts",
    "evaluate",
    "evaluate_seed",
    "frontier_metrics",
    "knob_values",
    "load_checkpoint_router",
    "pacing_replay",
    "pair_metrics",
    "split_estimates",
    "sweep_policy",
]


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
        heads[hname] = fitted.fit_head(hcfg, cal_name, seed, calibration_folds(run_cfg))

    def predict(split: str) -> tuple[dict[str, np.ndarray], list[str]]:
        prompts = fitted.wide[split][0]["prompt"]
        tasks = fitted.router.task_head.predict(fitted.task_X_of(prompts), texts=list(prompts))
        preds = {}
        for hname, head in heads.items():
            X = fitted.head_X_of(prompts, fitted.router.quality_layers if head is None else head.layers)
            preds[hname] = (
                fitted.router._quality_from_embeddings(X, texts=list(prompts))
                if head is None
                else predict_head(head, X, list(prompts))
            )
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


# ---- entry point -----------------------------------------------------------------------------
def _aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for m in per_seed for k, v in m.items() if isinstance(v, float)})
    out = {}
    for k in keys:
        mean, lo, hi = fr.mean_ci([m.get(k, math.nan) for m in per_seed])
        out[k] = {"mean": mean, "ci_lo": lo, "ci_hi": hi}
    return out


def evaluate(cfg: Any, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the evaluation for every seed in ``cfg.seeds``; write and return the summary.

    With ``cfg.shift.name`` other than ``none`` it runs the shift evaluation instead
    (:func:`router_ml.evaluation.shift.evaluate_shift`) and returns that summary."""
    from router_ml.evaluation.plots import plot_run

    cfg = _as_dict(cfg)
    run_dir = Path(run_dir or cfg.get("run_dir") or ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    if (cfg.get("shift") or {}).get("name", "none") != "none":
        from router_ml.evaluation.shift import evaluate_shift

        return evaluate_shift(cfg, run_dir)  # routing under shift (conf/shift/): its own outputs
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
