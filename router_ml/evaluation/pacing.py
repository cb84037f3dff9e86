"""Budget pacing replay: ``cost_aware`` over a long seeded stream of test prompts, spend against
the budget and the hard cap."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from router_ml.decision.base import Estimates
from router_ml.decision.policies import replay


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
