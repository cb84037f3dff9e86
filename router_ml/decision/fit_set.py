"""The policy fit set: the prompts a decision layer fits its policies on, with a router's predictions.

Policies resolve what depends on the model pool (auto capability tiers, budget tiers, the
strong/weak pair, the cost-aware pacing curve, the Zero router's hull) from :class:`Estimates` of a
calibration set (:meth:`Policy.fit`). The estimates' expected cost and latency come from the pool
a proxy serves (its backend catalog: prices, aliases, which models are up), so the fitted state is
only known at start-up; what a training run knows is the rest: the prompts and what the router
predicts for them. The checkpoint carries that (``router.json`` ``policy_fit`` + the ``policy_fit.quality``
array), so a proxy fits its policies without the project's data and without running the encoder::

    fit = PolicyFitSet.of_router(router, policy_fit_prompts())  # at training time
    layer.fit(fit.estimates(layer, served_models))               # at start-up
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from router_ml.decision.base import Estimates, PolicyError

if TYPE_CHECKING:
    from router_ml.decision.layer import DecisionLayer

#: prompts per task type in the default fit set (what the proxy fitted on before it was stored)
PER_TASK = 40


def policy_fit_prompts(per_task: int = PER_TASK) -> list[str]:
    """The default fit set's prompts: the first ``per_task`` of each task type among the project's
    own labelled prompts (``data/labelled_prompts/``; a source checkout)."""
    from router_ml.data.labelled import load_labelled

    return load_labelled("project").groupby("task", group_keys=False).head(per_task)["prompt"].tolist()


@dataclass(frozen=True)
class PolicyFitSet:
    """``prompts`` (n), the router's predicted ``tasks`` (n) and calibrated ``quality`` (n, m) over
    ``models`` (the router's columns); ``source`` says where the prompts come from."""

    prompts: list[str]
    tasks: list[str]
    quality: np.ndarray
    models: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        q = np.asarray(self.quality)
        n, m = len(self.prompts), len(self.models)
        if q.shape != (n, m):
            raise ValueError(f"policy fit set: quality has shape {q.shape}, expected ({n}, {m})")
        if len(self.tasks) != n:
            raise ValueError(f"policy fit set: {len(self.tasks)} tasks for {n} prompts")
        if n == 0:
            raise ValueError("policy fit set: no prompts")
        if not np.isfinite(q).all():
            raise ValueError("policy fit set: quality has non-finite values")

    @classmethod
    def of_router(cls, router: Any, prompts: Sequence[str], source: str = "") -> PolicyFitSet:
        """The router's predictions for ``prompts`` (quality and task from one encoder pass)."""
        quality, tasks = router.predict_quality_and_task(prompts)
        return cls(
            list(prompts), list(tasks), np.asarray(quality, dtype="float64"), list(router.models), source
        )

    def to_config(self) -> dict[str, Any]:
        """What ``router.json`` records (the quality matrix goes to the weights file)."""
        return {
            "source": self.source,
            "n_prompts": len(self.prompts),
            "prompts": self.prompts,
            "tasks": self.tasks,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], quality: np.ndarray, models: Sequence[str]) -> PolicyFitSet:
        return cls(
            list(config["prompts"]), list(config["tasks"]), quality, list(models), config.get("source", "")
        )

    def estimates(self, layer: DecisionLayer, models: Sequence[str]) -> Estimates:
        """``layer``'s estimates of the fit set over ``models`` (a subset of :attr:`models`, in this order)."""
        missing = [m for m in models if m not in self.models]
        if missing:
            raise PolicyError(
                f"policy fit set has no predictions for model(s) {missing}; it has {self.models}"
            )
        cols = [self.models.index(m) for m in models]
        return layer.estimates(self.prompts, self.quality[:, cols], list(models), self.tasks)
