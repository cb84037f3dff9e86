"""What every policy takes and returns.

A policy sees :class:`Estimates` for ``n`` requests over ``m`` candidate models - predicted quality,
the predicted task, expected cost and latency, and which models are allowed - and picks one model
per request. :class:`RoutingDecision` is what a single request gets back: the model, an ordered
fallback list and a readable reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np


class PolicyError(ValueError):
    """A policy that cannot be built or applied as configured (names the policy and the problem)."""


class BudgetExhausted(RuntimeError):
    """No candidate fits under the hard spend cap: the request is refused rather than overspent."""


@dataclass
class RoutingDecision:
    """One routing decision: the chosen model, why, and what to try if it fails."""

    model: str
    task: str
    task_confidence: float
    predicted_quality: dict[str, float]
    reason: str
    fallbacks: list[str] = field(default_factory=list)
    policy: str | None = None
    expected_cost_usd: float | None = None
    expected_ttft_s: float | None = None
    expected_latency_s: float | None = None
    max_tokens: int | None = None
    # with a NoveltyGuard: how unlike the training prompts this one is (0..1), each candidate's
    # quality interval (lower, upper), and whether the estimates leaned mostly on the pool prior
    novelty: float | None = None
    quality_interval: dict[str, tuple[float, float]] | None = None
    fell_back_to_prior: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Uncertainty:
    """What a router's :class:`~router_ml.predictors.guard.NoveltyGuard` adds to ``n`` decisions over
    the ``m`` candidate models: ``novelty`` (n,), ``shrink`` (n,) the prior's weight in the
    quality (1 where the guard's novelty margin overruled the head's pick), ``lower`` / ``upper`` (n, m) the interval of each predicted quality, and
    ``prior_model`` the model the conservative prior alone would pick (the best single model)."""

    novelty: np.ndarray
    shrink: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    prior_model: str


@dataclass
class Estimates:
    """Inputs of a decision for ``n`` requests over ``m`` models (arrays are (n, m) unless noted).

    ``quality``: predicted quality in [0, 1]; ``tasks`` (n,): predicted task type; ``cost``: expected
    $ of the call; ``cost_upper``: a hard bound on it where one is known (the model's
    ``max_tokens``), NaN elsewhere (the hard budget cap uses it);
    ``ttft`` / ``latency``: expected first-token and completion seconds; ``is_local`` (m,): served
    by the project's own vLLM pool; ``params_b`` (m,): nominal size in billions (NaN unknown);
    ``feasible``: models the request may use at all (allowed models, context window);
    ``observed``: true scores, read only by the oracle baseline; ``quality_lower``: the lower
    bound of each predicted quality's interval, where the router has one (a risk-averse utility
    policy reads it).
    """

    models: list[str]
    quality: np.ndarray
    tasks: np.ndarray
    cost: np.ndarray
    ttft: np.ndarray
    latency: np.ndarray
    is_local: np.ndarray
    params_b: np.ndarray | None = None
    task_proba: np.ndarray | None = None
    cost_upper: np.ndarray | None = None
    feasible: np.ndarray | None = None
    observed: np.ndarray | None = None
    quality_lower: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, m = np.shape(self.quality)
        if len(self.models) != m:
            raise PolicyError(f"estimates: {len(self.models)} model names for {m} quality columns")
        self.tasks = np.asarray(self.tasks, dtype=object)
        for name in ("cost", "ttft", "latency", "cost_upper", "feasible", "observed", "quality_lower"):
            value = getattr(self, name)
            if value is not None and np.shape(value) != (n, m):
                raise PolicyError(f"estimates: {name} has shape {np.shape(value)}, expected {(n, m)}")
        if self.tasks.shape != (n,):
            raise PolicyError(f"estimates: tasks has shape {self.tasks.shape}, expected {(n,)}")
        self.is_local = np.asarray(self.is_local, dtype=bool)
        if self.params_b is None:
            self.params_b = np.full(m, np.nan)

    def __len__(self) -> int:
        return len(self.quality)

    @property
    def upper(self) -> np.ndarray:
        return self.cost if self.cost_upper is None else self.cost_upper

    @property
    def allowed(self) -> np.ndarray:
        return np.ones(self.quality.shape, dtype=bool) if self.feasible is None else self.feasible

    _PER_REQUEST: ClassVar[tuple[str, ...]] = (
        "quality",
        "tasks",
        "cost",
        "ttft",
        "latency",
        "task_proba",
        "cost_upper",
        "feasible",
        "observed",
        "quality_lower",
    )

    def take(self, idx: Any) -> Estimates:
        """The estimates of the requests ``idx`` (an index array or slice): the per-request arrays
        cut, nothing checked again (cutting checked estimates keeps them consistent)."""
        view = object.__new__(type(self))  # a shallow copy without copy.copy's reduce protocol
        view.__dict__.update(self.__dict__)
        for name in self._PER_REQUEST:
            value = getattr(self, name)
            if value is not None:
                setattr(view, name, value[idx])
        return view


def argmax_cheapest(score: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """(n,) argmax of ``score`` per row, ties broken by the lower ``cost`` (then the lower index)."""
    tied = score >= score.max(axis=1, keepdims=True) - 1e-12
    return np.where(tied, cost, np.inf).argmin(axis=1)


def fallback_order(
    quality: Sequence[float], is_local: Sequence[bool], chosen: int, usable: Sequence[bool], max_len: int = 3
) -> list[int]:
    """The fallback chain after ``chosen`` for one request, as in the seed article's FallbackRouter.

    Best to most reliable: the other usable models by predicted quality, hosted API models first and
    the project's local models after them, because the last resort should not depend on the network
    or an API key. If no local model made the chain, the best local model (when there is one) ends it.
    """
    others = [j for j in range(len(quality)) if j != chosen and usable[j]]
    others.sort(key=lambda j: (bool(is_local[j]), -quality[j], j))
    chain = others[:max_len]
    if not any(is_local[j] for j in chain):
        local = [j for j in range(len(quality)) if is_local[j] and j != chosen]
        if local:
            best_local = max(local, key=lambda j: (quality[j], -j))
            chain = [*chain[: max_len - 1], best_local] if max_len > 0 else chain
    return chain
