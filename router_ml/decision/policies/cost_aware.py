"""The ``cost_aware`` policy: quality - lambda * cost with lambda paced online so spend tracks a
budget over a horizon, never crossing a hard cap."""

from __future__ import annotations

import math

import numpy as np

from router_ml.decision.base import BudgetExhausted, Estimates, PolicyError, argmax_cheapest
from router_ml.decision.policies.base import Policy


class CostAwarePolicy(Policy):
    """Quality - lambda * cost with lambda paced online so spend tracks a budget, under a hard cap.

    The budget ``budget_usd`` is meant to last ``horizon`` requests (a period's expected traffic).
    Before each request the policy sets the spend rate it can afford, ``(budget - spent) /
    (requests left)``, and the lambda whose expected per-request cost on the calibration set equals
    it (a monotone curve fitted in :meth:`fit`). Finished requests teach it how far real bills run
    from the expected costs (a running ratio, weight ``eta``), which rescales the affordable rate.
    A model is usable only when ``spent + its cost bound <= hard_cap_usd`` (default the budget);
    with no model under the cap the request is refused (:class:`BudgetExhausted`). The bound is
    exact where the estimates carry one (``cost_upper``: the model's ``max_tokens``, which the proxy
    enforces); elsewhere it is the expected cost times ``bound_factor``, raised online to the largest
    actual/expected bill ratio seen, so the cap holds unless a bill exceeds every earlier ratio.
    Knob: ``budget_usd``; a request may lower the budget and the hard cap, never raise them
    (:meth:`DecisionLayer._policy_for <router_ml.decision.layer.DecisionLayer._policy_for>`).
    """

    name = "cost_aware"
    knob = "budget_usd"
    stateful = True

    def __init__(
        self,
        budget_usd: float = 1.0,
        horizon: int = 10_000,
        hard_cap_usd: float | None = None,
        eta: float = 0.05,
        grid_size: int = 200,
        bound_factor: float = 2.0,
    ):
        if budget_usd <= 0 or horizon <= 0:
            raise PolicyError(f"cost_aware: budget_usd and horizon must be > 0, got {budget_usd}, {horizon}")
        self.budget_usd = float(budget_usd)
        self.horizon = int(horizon)
        self.hard_cap_usd = hard_cap_usd
        self.eta = eta
        self.grid_size = grid_size
        self.bound_factor = float(bound_factor)
        self.lams_: np.ndarray | None = None
        self.rates_: np.ndarray | None = None
        self._ratio = 1.0
        self._max_ratio = 1.0
        self._seen = 0

    @property
    def cap(self) -> float:
        return self.budget_usd if self.hard_cap_usd is None else float(self.hard_cap_usd)

    def spend_cap(self) -> float | None:
        return self.cap

    def fit(self, est: Estimates) -> CostAwarePolicy:
        """Mean per-request cost of argmax(q - lambda c) for a log grid of lambda (the pacing curve)."""
        spread = np.nanmax(est.cost) - np.nanmin(est.cost)
        hi = 1e4 / max(float(np.nanmean(est.cost)), 1e-12)
        lams = (
            np.concatenate([[0.0], np.geomspace(hi * 1e-8, hi, self.grid_size - 1)])
            if spread > 0
            else np.zeros(1)
        )
        ok = est.allowed
        rates = np.empty(len(lams))
        for i, lam in enumerate(lams):
            j = argmax_cheapest(np.where(ok, est.quality - lam * est.cost, -np.inf), est.cost)
            rates[i] = est.cost[np.arange(len(est)), j].mean()
        # make the curve monotone non-increasing in lambda
        self.lams_, self.rates_ = lams, np.minimum.accumulate(rates)
        self.reset()
        return self

    def reset(self) -> None:
        self._ratio = 1.0
        self._max_ratio = 1.0
        self._seen = 0

    def resume(self, requests_done: int) -> None:
        self._seen = max(0, int(requests_done))

    def lam_for_rate(self, rate: float) -> float:
        if self.lams_ is None or self.rates_ is None:
            raise PolicyError("cost_aware policy is not fitted: call fit(estimates) first")
        if rate >= self.rates_[0]:
            return 0.0
        if rate <= self.rates_[-1]:
            return float(self.lams_[-1])
        # rates_ is non-increasing: interpolate lambda on the reversed curve (log lambda)
        r, lam = self.rates_[::-1], self.lams_[::-1]
        k = int(np.searchsorted(r, rate))
        r0, r1, l0, l1 = r[k - 1], r[k], lam[k - 1], lam[k]
        if r1 == r0 or l0 <= 0 or l1 <= 0:
            return float(l1)
        w = (rate - r0) / (r1 - r0)
        return float(math.exp(math.log(l0) + w * (math.log(l1) - math.log(l0))))

    def current_lam(self, spent: float) -> float:
        left = max(self.horizon - self._seen, 1)
        rate = max(self.budget_usd - spent, 0.0) / left
        return self.lam_for_rate(rate / self._ratio)

    def bound(self, est: Estimates) -> np.ndarray:
        """(n, m) the most each call may cost: the exact bound where known, else a safety factor."""
        loose = est.cost * max(self.bound_factor, self._max_ratio)
        if est.cost_upper is None:
            return loose
        return np.where(np.isnan(est.cost_upper), loose, est.cost_upper)

    def usable(self, est: Estimates, spent: float = 0.0) -> np.ndarray:
        return est.allowed & (spent + self.bound(est) <= self.cap + 1e-15)

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        """A static decision at zero spend, no pacing."""
        lam = self.current_lam(0.0)
        ok = self.usable(est) if usable is None else usable
        score = np.where(ok, est.quality - lam * est.cost, -np.inf)
        return argmax_cheapest(score, est.cost)

    def step(self, est: Estimates, spent: float) -> int:
        ok = self.usable(est, spent)[0]
        if not ok.any():
            raise BudgetExhausted(
                f"cost_aware: ${spent:.6f} of the ${self.cap:.6f} hard cap spent; no model fits the rest"
            )
        lam = self.current_lam(spent)
        score = np.where(ok, est.quality[0] - lam * est.cost[0], -np.inf)
        return int(argmax_cheapest(score[None, :], est.cost)[0])

    def observe_cost(self, expected: float, actual: float) -> None:
        """Count the request and learn the actual/expected bill ratio (bills above the estimates
        lower the affordable rate the curve is read at, so lambda rises)."""
        self._seen += 1
        if expected > 0 and math.isfinite(actual) and actual >= 0:
            self._max_ratio = max(self._max_ratio, actual / expected)
            ratio = float(np.clip(actual / expected, 0.1, 10.0))
            self._ratio = (1 - self.eta) * self._ratio + self.eta * ratio

    def explain(self, est: Estimates, j: int, usable: np.ndarray | None = None) -> str:
        return f"cost_aware: max quality - lambda x cost with lambda paced to the ${self.budget_usd:g} budget: {est.models[j]}"
