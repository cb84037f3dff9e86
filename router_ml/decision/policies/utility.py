"""The ``utility`` policy: argmax quality - lambda * cost under a latency SLO, a per-request cost
cap and per-task allowed models (the hybrid)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from router_ml.decision.base import Estimates, PolicyError, argmax_cheapest
from router_ml.decision.policies.base import SLO_PRESETS, Policy, latency_mask


class UtilityPolicy(Policy):
    """The hybrid: argmax predicted quality - ``lam`` * expected $ cost, subject to the latency SLO,
    a maximum cost per request and the models allowed per task.

    One knob: ``lam`` (quality points given up per extra dollar: 0 = best quality regardless of
    cost), or ``target_quality`` (the cheapest model predicted to reach it; the best if none does).
    When no model meets the hard constraints the fastest (for a latency SLO) or the cheapest model
    of the allowed ones is taken, and the reason says so.

    ``risk`` in [0, 1] makes it risk-averse where the router gives quality intervals (a
    NoveltyGuard): it decides on ``quality - risk * (quality - lower bound)``, so ``risk=1`` ranks
    models by the lower bound of their interval; 0 (the default) by the point estimate.
    """

    name = "utility"
    knob = "lam"

    def __init__(
        self,
        lam: float = 0.0,
        target_quality: float | None = None,
        max_cost_usd: float | None = None,
        ttft_slo_s: float | None = None,
        latency_slo_s: float | None = None,
        slo: str | None = None,
        allowed_per_task: Mapping[str, Sequence[str]] | None = None,
        risk: float = 0.0,
    ):
        if lam < 0:
            raise PolicyError(f"utility: lam must be >= 0, got {lam}")
        if not 0.0 <= float(risk) <= 1.0:
            raise PolicyError(f"utility: risk must be in [0, 1], got {risk}")
        self.risk = float(risk)
        self.lam = float(lam)
        self.target_quality = target_quality
        self.max_cost_usd = max_cost_usd
        if slo is not None and slo not in SLO_PRESETS:
            raise PolicyError(f"unknown SLO preset {slo!r}; known: {sorted(SLO_PRESETS)}")
        self.slo, self.ttft_slo_s, self.latency_slo_s = slo, ttft_slo_s, latency_slo_s
        self.allowed_per_task = {k: list(v) for k, v in (allowed_per_task or {}).items()}

    def limits(self) -> tuple[float | None, float | None]:
        """(first-token SLO, completion SLO): explicit values win over the preset's."""
        t, c = SLO_PRESETS[self.slo][:2] if self.slo is not None else (None, None)
        return (
            self.ttft_slo_s if self.ttft_slo_s is not None else t,
            self.latency_slo_s if self.latency_slo_s is not None else c,
        )

    def usable(self, est: Estimates) -> np.ndarray:
        ok = latency_mask(est, *self.limits())
        if self.max_cost_usd is not None:
            ok &= est.cost <= self.max_cost_usd
        for task, names in self.allowed_per_task.items():
            unknown = set(names) - set(est.models)
            if unknown:
                raise PolicyError(
                    f"utility: allowed_per_task[{task!r}] names unknown model(s) {sorted(unknown)}"
                )
            wanted = set(names)
            cols = np.array([m in wanted for m in est.models], dtype=bool)  # = np.isin(est.models, names)
            ok[est.tasks == task] &= cols[None, :]
        return ok

    def _fallback_when_empty(self, est: Estimates, ok: np.ndarray) -> np.ndarray:
        empty = ~ok.any(axis=1)
        if empty.any():
            key = est.latency if any(v is not None for v in self.limits()) else est.cost
            alt = np.where(est.allowed, key, np.inf)
            pick = np.argmin(alt, axis=1)
            ok = ok.copy()
            ok[empty, pick[empty]] = True
        return ok

    def quality_for(self, est: Estimates) -> np.ndarray:
        """(n, m) the quality this policy decides on: the point estimate, moved ``risk`` of the way
        to the interval's lower bound where the estimates carry one."""
        if self.risk == 0.0 or est.quality_lower is None:
            return est.quality
        return est.quality - self.risk * (est.quality - est.quality_lower)

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        ok = self._fallback_when_empty(est, self.usable(est) if usable is None else usable)
        quality = self.quality_for(est)
        if self.target_quality is not None:
            reach = ok & (quality >= self.target_quality)
            cheapest = argmax_cheapest(np.where(reach, -est.cost, -np.inf), est.cost)
            best = argmax_cheapest(np.where(ok, quality, -np.inf), est.cost)
            return np.where(reach.any(axis=1), cheapest, best)
        score = np.where(ok, quality - self.lam * est.cost, -np.inf)
        return argmax_cheapest(score, est.cost)

    def explain(self, est: Estimates, j: int, usable: np.ndarray | None = None) -> str:
        model, q, c = est.models[j], est.quality[0, j], est.cost[0, j]
        if not (self.usable(est)[0] if usable is None else usable).any():
            return f"utility: no model meets the constraints; took {model} as the least bad"
        if self.target_quality is not None:
            if q < self.target_quality:
                return (
                    f"utility: no usable model is predicted to reach quality {self.target_quality:.2f}; "
                    f"best predicted: {model} (q={q:.2f}, ${c:.6f})"
                )
            return (
                f"utility: cheapest model predicted to reach quality {self.target_quality:.2f}: "
                f"{model} (q={q:.2f}, ${c:.6f})"
            )
        risk = f" at risk {self.risk:g} (q_lo={self.quality_for(est)[0, j]:.2f})" if self.risk else ""
        return f"utility: max quality - {self.lam:g} x cost{risk}: {model} (q={q:.2f}, ${c:.6f})"
