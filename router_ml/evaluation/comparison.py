"""Metrics over a comparison: AIQ, quality at the best single model's cost, gap closed, APGR/CPT
and the per-task breakdown, from the frontier rows of one split."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from router_ml.decision.base import Estimates
from router_ml.decision.hull import ndch
from router_ml.evaluation import frontier as fr


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
        hc, hq = ndch(c, q)
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
