"""Reference policies: ``threshold`` (RouteLLM strong/weak), ``random``, ``zero`` (RouterBench's
Zero router) and ``oracle`` (the best true score; offline evaluation only)."""

from __future__ import annotations

import numpy as np

from router_ml.decision.base import Estimates, PolicyError, argmax_cheapest
from router_ml.decision.hull import ndch
from router_ml.decision.policies.base import Policy, _mean_by_model, strongest_model


class _PairMixin:
    strong: str | None
    weak: str | None
    pair_: tuple[int, int] | None

    def _resolve_pair(self, est: Estimates) -> tuple[int, int]:
        for name in (self.strong, self.weak):
            if name and name not in est.models:
                raise PolicyError(f"{self.name}: model {name!r} is not in the pool {est.models}")
        strong = est.models.index(self.strong) if self.strong else strongest_model(est)
        if self.weak:
            weak = est.models.index(self.weak)
        else:  # the cheapest model other than the strong one (ties in price are common in one pool)
            cost = _mean_by_model(est, est.cost)
            cost[strong] = np.inf
            weak = int(np.argmin(cost)) if len(cost) > 1 else strong
        if strong == weak:
            raise PolicyError(f"strong and weak models are the same ({est.models[strong]})")
        return strong, weak


class ThresholdPolicy(_PairMixin, Policy):
    """RouteLLM-style strong/weak routing: the strong model when its predicted advantage
    ``q_strong - q_weak`` is at least ``threshold``. ``strong``/``weak`` default to the strongest
    and the cheapest model. Knob: ``threshold`` (sweep it over quantiles of the advantage)."""

    name = "threshold"
    knob = "threshold"

    def __init__(self, threshold: float = 0.0, strong: str | None = None, weak: str | None = None):
        self.threshold = float(threshold)
        self.strong, self.weak = strong, weak
        self.pair_: tuple[int, int] | None = None

    def fit(self, est: Estimates) -> ThresholdPolicy:
        self.pair_ = self._resolve_pair(est)
        return self

    def advantage(self, est: Estimates) -> np.ndarray:
        if self.pair_ is None:
            self.fit(est)
        s, w = self.pair_
        return est.quality[:, s] - est.quality[:, w]

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        s, w = self.pair_ or self.fit(est).pair_
        return np.where(self.advantage(est) >= self.threshold, s, w).astype(np.int64)

    def explain(self, est: Estimates, j: int, usable: np.ndarray | None = None) -> str:
        return f"threshold: predicted advantage of the strong model {self.advantage(est)[0]:+.3f} vs threshold {self.threshold:g} -> {est.models[j]}"


class RandomPolicy(_PairMixin, Policy):
    """Random mixing: the strong model with probability ``p_strong``, else the weak one (RouteLLM's
    random router); ``uniform=True`` picks uniformly among the allowed models instead."""

    name = "random"
    knob = "p_strong"

    def __init__(
        self,
        p_strong: float = 0.5,
        strong: str | None = None,
        weak: str | None = None,
        uniform: bool = False,
        seed: int = 0,
    ):
        if not 0.0 <= p_strong <= 1.0:
            raise PolicyError(f"random: p_strong must be in [0, 1], got {p_strong}")
        self.p_strong, self.strong, self.weak, self.uniform, self.seed = (
            float(p_strong),
            strong,
            weak,
            uniform,
            seed,
        )
        self.pair_: tuple[int, int] | None = None
        self._rng = np.random.default_rng(seed)

    def fit(self, est: Estimates) -> RandomPolicy:
        self.pair_ = None if self.uniform else self._resolve_pair(est)
        self._rng = np.random.default_rng(self.seed)
        return self

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        if self.uniform:
            noise = self._rng.random(est.quality.shape)
            return np.argmax(np.where(est.allowed, noise, -1.0), axis=1)
        s, w = self.pair_ or self.fit(est).pair_
        return np.where(self._rng.random(len(est)) < self.p_strong, s, w).astype(np.int64)

    def explain(self, est: Estimates, j: int, usable: np.ndarray | None = None) -> str:
        return f"random: {est.models[j]}"


class ZeroRouterPolicy(Policy):
    """RouterBench's Zero router as a policy: random mixing of the two single models adjacent on
    the single models' (cost, quality) hull, to hit a cost level. Knob ``position`` in [0, 1] runs
    from the cheapest hull model to the best one. Fitted on ``observed`` scores when the estimates
    carry them, else on predicted quality."""

    name = "zero"
    knob = "position"

    def __init__(self, position: float = 1.0, seed: int = 0):
        self.position, self.seed = float(position), seed
        self.hull_: list[tuple[int, float, float]] = []
        self._rng = np.random.default_rng(seed)

    def fit(self, est: Estimates) -> ZeroRouterPolicy:

        q = est.observed if est.observed is not None else est.quality
        cost, qual = _mean_by_model(est, est.cost), _mean_by_model(est, q)
        hc, hq = ndch(cost, qual)
        self.hull_ = []
        for c, v in zip(hc, hq, strict=True):
            j = int(np.argmin(np.abs(cost - c) + np.abs(qual - v)))
            self.hull_.append((j, float(c), float(v)))
        self._rng = np.random.default_rng(self.seed)
        return self

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        if not self.hull_:
            self.fit(est)
        costs = np.array([c for _, c, _ in self.hull_])
        target = costs[0] + self.position * (costs[-1] - costs[0])
        k = int(np.clip(np.searchsorted(costs, target), 1, len(costs) - 1)) if len(costs) > 1 else 0
        if len(costs) == 1:
            return np.full(len(est), self.hull_[0][0], dtype=np.int64)
        lo, hi = self.hull_[k - 1], self.hull_[k]
        w = 0.0 if hi[1] == lo[1] else (target - lo[1]) / (hi[1] - lo[1])
        return np.where(self._rng.random(len(est)) < w, hi[0], lo[0]).astype(np.int64)


class OraclePolicy(Policy):
    """Per request the model with the best TRUE score, the cheapest among ties (an upper bound;
    needs ``observed`` scores, so it exists only in offline evaluation)."""

    name = "oracle"

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        if est.observed is None:
            raise PolicyError("oracle: the estimates carry no observed scores (offline evaluation only)")
        score = np.where(np.isnan(est.observed) | ~est.allowed, -np.inf, est.observed)
        return argmax_cheapest(score, est.cost)
