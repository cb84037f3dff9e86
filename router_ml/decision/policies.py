"""Routing policies: one class each, the same inputs (:class:`Estimates`), one knob to sweep.

Every policy implements ``choose(est) -> (n,) model index`` for a batch and ``explain`` for the
reason a single request gets. Policies that spend a budget (``budget_ratio``, ``cost_aware``) are
*stateful*: their decision depends on what has been spent, so they decide request by request with
``step(est_row, spent)`` and the caller records the real cost (a :mod:`router_ml.decision.ledger`
ledger live, or the replay loop of :func:`replay` offline).

Policies (``conf/policy/<name>.yaml``):

- ``capability``: the seed article's table, task type -> model (+ max_tokens); unknown -> strongest.
- ``budget_ratio``: the seed's CostAwareRouter, expensive -> medium -> cheap as the budget is spent.
- ``cost_aware``: maximise quality - lambda * cost with lambda paced online so spend tracks a budget
  over a horizon, never crossing a hard cap.
- ``latency_aware``: the best model whose expected first-token and completion times meet the SLO.
- ``utility``: the hybrid; argmax quality - lambda * cost under a latency SLO, a per-request cost cap
  and per-task allowed models; one knob (``lam``, or ``target_quality``).
- baselines ``threshold`` (RouteLLM strong/weak), ``random``, ``zero`` (Zero router), ``oracle``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from router_ml.decision.base import BudgetExhausted, Estimates, PolicyError, argmax_cheapest

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

    def choose(self, est: Estimates) -> np.ndarray:
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

    def explain(self, est: Estimates, j: int) -> str:
        return f"{self.name}: {est.models[j]}"

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}


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

    def choose(self, est: Estimates) -> np.ndarray:
        self._check_fitted()
        return np.array([self.table_.get(t, self.default_) for t in est.tasks], dtype=np.int64)

    def explain(self, est: Estimates, j: int) -> str:
        task = est.tasks[0]
        if task in self.table_:
            return f"capability: task {task} -> {est.models[j]} (rule)"
        return f"capability: task {task} has no rule -> strongest model {est.models[j]}"


class UtilityPolicy(Policy):
    """The hybrid: argmax predicted quality - ``lam`` * expected $ cost, subject to the latency SLO,
    a maximum cost per request and the models allowed per task.

    One knob: ``lam`` (quality points given up per extra dollar: 0 = best quality regardless of
    cost), or ``target_quality`` (the cheapest model predicted to reach it; the best if none does).
    When no model meets the hard constraints the fastest (for a latency SLO) or the cheapest model
    of the allowed ones is taken, and the reason says so.
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
    ):
        if lam < 0:
            raise PolicyError(f"utility: lam must be >= 0, got {lam}")
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
            cols = np.isin(est.models, names)
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

    def choose(self, est: Estimates) -> np.ndarray:
        ok = self._fallback_when_empty(est, self.usable(est))
        if self.target_quality is not None:
            reach = ok & (est.quality >= self.target_quality)
            cheapest = argmax_cheapest(np.where(reach, -est.cost, -np.inf), est.cost)
            best = argmax_cheapest(np.where(ok, est.quality, -np.inf), est.cost)
            return np.where(reach.any(axis=1), cheapest, best)
        score = np.where(ok, est.quality - self.lam * est.cost, -np.inf)
        return argmax_cheapest(score, est.cost)

    def explain(self, est: Estimates, j: int) -> str:
        q, c = est.quality[0, j], est.cost[0, j]
        if not self.usable(est)[0].any():
            return f"utility: no model meets the constraints; took {est.models[j]} as the least bad"
        if self.target_quality is not None:
            if q < self.target_quality:
                return (
                    f"utility: no usable model is predicted to reach quality {self.target_quality:.2f}; "
                    f"best predicted: {est.models[j]} (q={q:.2f}, ${c:.6f})"
                )
            return (
                f"utility: cheapest model predicted to reach quality {self.target_quality:.2f}: "
                f"{est.models[j]} (q={q:.2f}, ${c:.6f})"
            )
        return f"utility: max quality - {self.lam:g} x cost: {est.models[j]} (q={q:.2f}, ${c:.6f})"


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

    def choose(self, est: Estimates) -> np.ndarray:
        ok = self.usable(est)
        best = argmax_cheapest(np.where(ok, est.quality, -np.inf), est.cost)
        fastest = np.argmin(np.where(est.allowed, est.latency, np.inf), axis=1)
        return np.where(ok.any(axis=1), best, fastest)

    def explain(self, est: Estimates, j: int) -> str:
        t, c, size = self.limits()
        label = self.slo or "custom"
        ttft, lat = est.ttft[0, j], est.latency[0, j]
        limits = [f"ttft<={t}s"] if t is not None else []
        limits += [f"total<={c}s"] if c is not None else []
        limits += [f"size<={size:g}B"] if size is not None and math.isfinite(size) else []
        meets = ", ".join(limits) or "no limit"
        if not self.usable(est)[0].any():
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

    def choose(self, est: Estimates) -> np.ndarray:  # at zero spend
        return np.full(len(est), self.step(est.take(slice(0, 1)), 0.0), dtype=np.int64)

    def step(self, est: Estimates, spent: float) -> int:
        if not self.tiers_:
            raise PolicyError("budget_ratio policy is not fitted: call fit(estimates) first")
        return self.tiers_[self.tier(spent)]

    def explain(self, est: Estimates, j: int) -> str:
        return (
            f"budget_ratio: {est.models[j]} (tier by share of the ${self.budget_usd:g} session budget spent)"
        )


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
    Knob: ``budget_usd``.
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

    def choose(self, est: Estimates) -> np.ndarray:  # a static decision at zero spend, no pacing
        lam = self.current_lam(0.0)
        score = np.where(self.usable(est), est.quality - lam * est.cost, -np.inf)
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

    def explain(self, est: Estimates, j: int) -> str:
        return f"cost_aware: max quality - lambda x cost with lambda paced to the ${self.budget_usd:g} budget: {est.models[j]}"


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

    def choose(self, est: Estimates) -> np.ndarray:
        s, w = self.pair_ or self.fit(est).pair_
        return np.where(self.advantage(est) >= self.threshold, s, w).astype(np.int64)

    def explain(self, est: Estimates, j: int) -> str:
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

    def choose(self, est: Estimates) -> np.ndarray:
        if self.uniform:
            noise = self._rng.random(est.quality.shape)
            return np.argmax(np.where(est.allowed, noise, -1.0), axis=1)
        s, w = self.pair_ or self.fit(est).pair_
        return np.where(self._rng.random(len(est)) < self.p_strong, s, w).astype(np.int64)

    def explain(self, est: Estimates, j: int) -> str:
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
        from router_ml.evaluation.frontier import ndch

        q = est.observed if est.observed is not None else est.quality
        cost, qual = _mean_by_model(est, est.cost), _mean_by_model(est, q)
        hc, hq = ndch(cost, qual)
        self.hull_ = []
        for c, v in zip(hc, hq, strict=True):
            j = int(np.argmin(np.abs(cost - c) + np.abs(qual - v)))
            self.hull_.append((j, float(c), float(v)))
        self._rng = np.random.default_rng(self.seed)
        return self

    def choose(self, est: Estimates) -> np.ndarray:
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

    def choose(self, est: Estimates) -> np.ndarray:
        if est.observed is None:
            raise PolicyError("oracle: the estimates carry no observed scores (offline evaluation only)")
        score = np.where(np.isnan(est.observed) | ~est.allowed, -np.inf, est.observed)
        return argmax_cheapest(score, est.cost)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        CapabilityPolicy,
        UtilityPolicy,
        LatencyAwarePolicy,
        BudgetRatioPolicy,
        CostAwarePolicy,
        ThresholdPolicy,
        RandomPolicy,
        ZeroRouterPolicy,
        OraclePolicy,
    )
}


def build_policy(cfg: Mapping[str, Any] | str) -> Policy:
    """A policy from ``{"name": ..., **params}`` (a ``conf/policy`` entry) or a bare name."""
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    params = dict(cfg)
    name = params.pop("name", None)
    params.pop("sweep", None)  # evaluation settings, not policy parameters
    params.pop("heads", None)
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as e:
        raise PolicyError(f"policy {name!r}: bad parameters {sorted(params)}: {e}") from None


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
