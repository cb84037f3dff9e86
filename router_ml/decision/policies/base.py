"""What every policy shares: the :class:`Policy` contract, the SLO presets, pool-wide helpers
(strongest / cheapest model, the latency mask) and :func:`replay`, which runs a policy over a
stream of requests as they would arrive live."""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np

from router_ml.decision.base import BudgetExhausted, Estimates, PolicyError, argmax_cheapest

# The seed article's latency targets: (first token s, completion s, max model size in B params).
SLO_PRESETS: dict[str, tuple[float, float, float]] = {
    "realtime": (0.2, 2.0, 7.0),
    "interactive": (0.5, 5.0, 14.0),
    "batch": (1.0, 30.0, math.inf),
    "research": (2.0, 60.0, math.inf),
}


def _mean_by_model(est: Estimates, values: np.ndarray) -> np.ndarray:
    return np.nanmean(np.where(est.allowed, values, np.nan), axis=0)


def strongest_model(est: Estimates) -> int:
    """The model with the highest mean predicted quality (cheaper on ties)."""
    q = _mean_by_model(est, est.quality)
    return int(argmax_cheapest(q[None, :], _mean_by_model(est, est.cost)[None, :])[0])


def cheapest_model(est: Estimates) -> int:
    return int(np.nanargmin(_mean_by_model(est, est.cost)))


def latency_mask(
    est: Estimates, ttft_slo_s: float | None, latency_slo_s: float | None, max_params_b: float | None = None
) -> np.ndarray:
    """(n, m) models whose expected first-token and completion times meet the SLO.

    ``max_params_b`` applies to models of known size only (a hosted API's size is unknown; its
    latency estimate decides for it).
    """
    ok = est.allowed.copy()
    if ttft_slo_s is not None:
        ok &= est.ttft <= ttft_slo_s
    if latency_slo_s is not None:
        ok &= est.latency <= latency_slo_s
    if max_params_b is not None and math.isfinite(max_params_b):
        size = np.asarray(est.params_b, dtype="float64")
        ok &= ~(size > max_params_b)[None, :]
    return ok


class Policy:
    """Base class. Subclasses set ``name``, ``knob`` (the parameter a sweep varies) and ``choose``."""

    name: ClassVar[str] = "policy"
    knob: ClassVar[str | None] = None
    stateful: ClassVar[bool] = False

    def fit(self, est: Estimates) -> Policy:
        """Resolve what depends on the model pool (auto tiers, the strongest model) from estimates
        of a calibration set. Never sees true scores (except the oracle's own)."""
        return self

    def with_knob(self, value: Any) -> Policy:
        if self.knob is None:
            raise PolicyError(f"policy {self.name!r} has no knob to set")
        new = copy.copy(self)
        setattr(new, self.knob, value)
        return new

    def usable(self, est: Estimates) -> np.ndarray:
        """(n, m) models this policy may pick (hard constraints); default: the allowed ones."""
        return est.allowed

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        """(n,) the model column picked for each request; ``usable``: :meth:`usable` of ``est``
        when the caller has it already (the decision layer computes it once per batch)."""
        raise NotImplementedError

    def step(self, est: Estimates, spent: float) -> int:
        """Decide one request (``est`` has one row) given the spend so far."""
        return int(self.choose(est)[0])

    def reset(self) -> None:
        """Forget online state (stateful policies)."""

    def observe_cost(self, expected: float, actual: float) -> None:
        """Feedback after a request finished (stateful policies adapt)."""

    def resume(self, requests_done: int) -> None:
        """After a restart: ``requests_done`` requests of the current period are already booked."""

    def spend_cap(self) -> float | None:
        """The most this policy lets a period spend in all (None: no hard cap of its own)."""
        return None

    def max_tokens_for(self, task: str) -> int | None:
        """The output cap a rule of this policy sets for ``task`` requests (None: the model's own)."""
        return None

    def explain(self, est: Estimates, j: int, usable: np.ndarray | None = None) -> str:
        """Why model ``j`` for the one request of ``est``; ``usable`` (m,): its :meth:`usable` row."""
        return f"{self.name}: {est.models[j]}"

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}


def replay(
    policy: Policy, est: Estimates, actual_cost: np.ndarray, ledger: Any | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``policy`` over the requests of ``est`` in order, as they would arrive live.

    Stateless policies decide in one batch. Stateful ones decide request by request, seeing the
    spend so far, and learn from the actual cost of each call (``actual_cost`` (n, m): what the
    chosen call really cost). Returns ``(choice (n,), refused (n,) bool)``; a refused request
    (:class:`BudgetExhausted`) has choice -1 and costs nothing. ``ledger`` (optional) records every
    call; by default spend is kept in memory.
    """
    n = len(est)
    if not policy.stateful:
        return policy.choose(est), np.zeros(n, dtype=bool)
    policy.reset()
    choice = np.full(n, -1, dtype=np.int64)
    refused = np.zeros(n, dtype=bool)
    spent = 0.0
    for i in range(n):
        row = est.take(slice(i, i + 1))
        try:
            j = policy.step(row, spent)
        except BudgetExhausted:
            refused[i] = True
            policy.observe_cost(0.0, 0.0)
            continue
        choice[i] = j
        cost = float(actual_cost[i, j])
        cost = 0.0 if not math.isfinite(cost) else cost
        spent += cost
        if ledger is not None:
            ledger.record(cost, est.models[j], request_id=f"replay-{i}")
        policy.observe_cost(float(est.cost[i, j]), cost)
    return choice, refused
