"""Rule-based policies: ``capability`` (task type -> model), ``latency_aware`` (the best model
meeting an SLO) and ``budget_ratio`` (expensive -> medium -> cheap as a session budget is spent)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from router_ml.decision.base import Estimates, PolicyError, argmax_cheapest
from router_ml.decision.policies.base import (
    SLO_PRESETS,
    Policy,
    _mean_by_model,
    cheapest_model,
    latency_mask,
    strongest_model,
)

# The seed article's capability table: task -> (size range in B params, max_tokens, seed model).
# qa is not in the article's table: it is an "unknown" type and goes to the strongest model.
SEED_CAPABILITY: dict[str, dict[str, Any]] = {
    "classify": {"params_b": (1.0, 3.0), "max_tokens": 100, "model": "qwen2.5-1.5b-instruct"},
    "summarize": {"params_b": (3.0, 7.0), "max_tokens": 500, "model": "qwen2.5-7b-instruct"},
    "code": {
        "params_b": (7.0, 14.0),
        "max_tokens": 2000,
        "model": "qwen2.5-coder-7b-instruct",
        "prefer": "code",
    },
    "reason": {"params_b": (14.0, 32.0), "max_tokens": 4000, "model": "qwen2.5-32b-instruct"},
    "creative": {"params_b": (32.0, math.inf), "max_tokens": 8000, "model": "claude-sonnet-4"},
}


class CapabilityPolicy(Policy):
    """The seed article's capability-based routing: predicted task type -> model (+ max_tokens).

    ``rules``: mapping task -> {"model": name, "max_tokens": int}; ``"auto"`` resolves the seed's
    size tiers against the pool (per task, the best-predicted model within the seed's size range,
    else the nearest size; API models of unknown size count as the largest). Tasks with no rule,
    and rules naming a model not in the pool when ``strict`` is false, go to the strongest model.
    """

    name = "capability"

    def __init__(
        self, rules: Mapping[str, Any] | str = "auto", default: str = "strongest", strict: bool = True
    ):
        self.rules = rules if isinstance(rules, str) else {k: dict(v) for k, v in rules.items()}
        self.default = default
        self.strict = strict
        self.table_: dict[str, int] = {}
        self.max_tokens_: dict[str, int | None] = {}
        self.default_: int | None = None

    def fit(self, est: Estimates) -> CapabilityPolicy:
        models = est.models
        self.default_ = (
            strongest_model(est) if self.default == "strongest" else self._index(models, self.default)
        )
        self.table_, self.max_tokens_ = {}, {}
        if self.rules == "seed":  # the article's literal table
            for task, rule in SEED_CAPABILITY.items():
                self.table_[task] = self._index(models, rule["model"])
                self.max_tokens_[task] = rule["max_tokens"]
        elif self.rules == "auto":
            for task, rule in SEED_CAPABILITY.items():
                self.table_[task] = self._auto(est, task, rule)
                self.max_tokens_[task] = rule["max_tokens"]
        elif isinstance(self.rules, Mapping):
            for task, rule in self.rules.items():
                if "model" not in rule:
                    raise PolicyError(f"capability rule for task {task!r} has no 'model'")
                if rule["model"] not in models and not self.strict:
                    continue
                self.table_[task] = self._index(models, rule["model"])
                self.max_tokens_[task] = rule.get("max_tokens")
        else:
            raise PolicyError(f"capability rules must be a mapping, 'auto' or 'seed', got {self.rules!r}")
        return self

    @staticmethod
    def _index(models: Sequence[str], name: str) -> int:
        if name not in models:
            raise PolicyError(
                f"capability rule names model {name!r}, which is not in the pool {list(models)}"
            )
        return list(models).index(name)

    @staticmethod
    def _auto(est: Estimates, task: str, rule: Mapping[str, Any]) -> int:
        lo, hi = rule["params_b"]
        size = np.where(np.isnan(est.params_b), np.inf, est.params_b)
        rows = est.tasks == task
        q = _mean_by_model(
            est.take(rows) if rows.any() else est, est.quality[rows] if rows.any() else est.quality
        )
        inside = (size >= lo) & (size <= hi)
        if rule.get("prefer"):
            preferred = inside & np.array([rule["prefer"] in m.lower() for m in est.models])
            inside = preferred if preferred.any() else inside
        if inside.any():
            return int(np.nanargmax(np.where(inside, q, -np.inf)))
        # nearest size tier (log scale); API models (inf) are nearest to the open-ended top tier
        target = math.sqrt(lo * hi) if math.isfinite(hi) else max(lo, 1.0) * 4
        dist = np.abs(np.log(np.where(np.isfinite(size), size, 1e6)) - math.log(target))
        return int(np.argmin(dist))

    def _check_fitted(self) -> None:
        if self.default_ is None:
            raise PolicyError("capability policy is not fitted: call fit(estimates) first")

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        self._check_fitted()
        return np.array([self.table_.get(t, self.default_) for t in est.tasks], dtype=np.int64)

    def max_tokens_for(self, task: str) -> int | None:
        return self.max_tokens_.get(task)

    def explain(self, est: Estimates, j: int, usable: np.ndarray | None = None) -> str:
        task = est.tasks[0]
        if task in self.table_:
            return f"capability: task {task} -> {est.models[j]} (rule)"
        return f"capability: task {task} has no rule -> strongest model {est.models[j]}"


class LatencyAwarePolicy(Policy):
    """The best predicted model whose expected first-token and completion times meet the SLO.

    ``slo``: one of the seed article's presets (realtime, interactive, batch, research) or explicit
    ``ttft_slo_s`` / ``latency_slo_s``. The estimates come from the latency model, live once serving
    measures them. If none meets it, the model with the fastest expected completion.
    """

    name = "latency_aware"
    knob = "slo"

    def __init__(
        self,
        slo: str | None = "interactive",
        ttft_slo_s: float | None = None,
        latency_slo_s: float | None = None,
        max_params_b: float | None = None,
    ):
        if slo is not None and slo not in SLO_PRESETS:
            raise PolicyError(f"unknown SLO preset {slo!r}; known: {sorted(SLO_PRESETS)}")
        self.slo = slo
        self.ttft_slo_s, self.latency_slo_s, self.max_params_b = ttft_slo_s, latency_slo_s, max_params_b

    def limits(self) -> tuple[float | None, float | None, float | None]:
        if self.slo is not None:
            t, c, size = SLO_PRESETS[self.slo]
            return (
                self.ttft_slo_s if self.ttft_slo_s is not None else t,
                self.latency_slo_s if self.latency_slo_s is not None else c,
                self.max_params_b if self.max_params_b is not None else size,
            )
        return self.ttft_slo_s, self.latency_slo_s, self.max_params_b

    def usable(self, est: Estimates) -> np.ndarray:
        return latency_mask(est, *self.limits())

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        ok = self.usable(est) if usable is None else usable
        best = argmax_cheapest(np.where(ok, est.quality, -np.inf), est.cost)
        fastest = np.argmin(np.where(est.allowed, est.latency, np.inf), axis=1)
        return np.where(ok.any(axis=1), best, fastest)

    def explain(self, est: Estimates, j: int, usable: np.ndarray | None = None) -> str:
        t, c, size = self.limits()
        label = self.slo or "custom"
        ttft, lat = est.ttft[0, j], est.latency[0, j]
        limits = [f"ttft<={t}s"] if t is not None else []
        limits += [f"total<={c}s"] if c is not None else []
        limits += [f"size<={size:g}B"] if size is not None and math.isfinite(size) else []
        meets = ", ".join(limits) or "no limit"
        if not (self.usable(est)[0] if usable is None else usable).any():
            return f"latency_aware[{label}]: no model meets {meets}; fastest is {est.models[j]}"
        return (
            f"latency_aware[{label}]: best predicted of the models meeting {meets}: "
            f"{est.models[j]} (ttft {ttft:.2f}s, total {lat:.2f}s)"
        )


class _TierMixin:
    """expensive / medium / cheap tiers, given or resolved from the pool."""

    tiers: Mapping[str, str] | str
    tiers_: dict[str, int]

    def _resolve_tiers(self, est: Estimates) -> dict[str, int]:
        if isinstance(self.tiers, Mapping):
            out = {}
            for tier in ("expensive", "medium", "cheap"):
                name = self.tiers.get(tier)
                if name not in est.models:
                    raise PolicyError(f"tier {tier!r} names model {name!r}, not in the pool {est.models}")
                out[tier] = est.models.index(name)
            return out
        q = _mean_by_model(est, est.quality)
        c = _mean_by_model(est, est.cost)
        expensive, cheap = strongest_model(est), cheapest_model(est)
        between = (c > c[cheap]) & (c < c[expensive])
        medium = int(np.nanargmax(np.where(between, q, -np.inf))) if between.any() else cheap
        return {"expensive": expensive, "medium": medium, "cheap": cheap}


class BudgetRatioPolicy(_TierMixin, Policy):
    """The seed article's CostAwareRouter: spend ratio < 0.5 -> expensive, < 0.8 -> medium, else cheap.

    ``tiers``: {"expensive", "medium", "cheap"} model names, or ``"auto"`` (strongest, best
    predicted among the models priced in between, cheapest). Knob: ``budget_usd`` for the session.
    """

    name = "budget_ratio"
    knob = "budget_usd"
    stateful = True

    def __init__(self, budget_usd: float = 1.0, tiers: Mapping[str, str] | str = "auto", ratios=(0.5, 0.8)):
        if budget_usd <= 0:
            raise PolicyError(f"budget_ratio: budget_usd must be > 0, got {budget_usd}")
        self.budget_usd = float(budget_usd)
        self.tiers = tiers if isinstance(tiers, str) else dict(tiers)
        self.ratios = tuple(ratios)
        self.tiers_: dict[str, int] = {}

    def fit(self, est: Estimates) -> BudgetRatioPolicy:
        self.tiers_ = self._resolve_tiers(est)
        return self

    def tier(self, spent: float) -> str:
        ratio = spent / self.budget_usd
        return "expensive" if ratio < self.ratios[0] else "medium" if ratio < self.ratios[1] else "cheap"

    def choose(self, est: Estimates, usable: np.ndarray | None = None) -> np.ndarray:
        """The tier at zero spend, for every request."""
        return np.full(len(est), self.step(est.take(slice(0, 1)), 0.0), dtype=np.int64)

    def step(self, est: Estimates, spent: float) -> int:
        if not self.tiers_:
            raise PolicyError("budget_ratio policy is not fitted: call fit(estimates) first")
        return self.tiers_[self.tier(spent)]

    def explain(self, est: Estimates, j: int, usable: np.ndarray | None = None) -> str:
        return (
            f"budget_ratio: {est.models[j]} (tier by share of the ${self.budget_usd:g} session budget spent)"
        )
