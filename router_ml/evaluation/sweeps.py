"""Policy sweeps: the knob values a policy is swept over, and one frontier row (quality, cost,
latency, SLO attainment, refusals) per value."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from router_ml.decision.base import Estimates
from router_ml.decision.policies import Policy, build_policy, replay


def knob_values(policy_cfg: Mapping[str, Any], policy: Policy, est: Estimates, ref_cost: float) -> list[Any]:
    """The knob values a policy is swept over (``sweep`` in its router_ml/conf/policy entry)."""
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
