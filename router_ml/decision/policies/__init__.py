"""Routing policies: one class each, the same inputs (:class:`Estimates`), one knob to sweep.

Every policy implements ``choose(est) -> (n,) model index`` for a batch and ``explain`` for the
reason a single request gets. Policies that spend a budget (``budget_ratio``, ``cost_aware``) are
*stateful*: their decision depends on what has been spent, so they decide request by request with
``step(est_row, spent)`` and the caller records the real cost (a :mod:`router_ml.decision.ledger`
ledger live, or the replay loop of :func:`replay` offline).

Policies (``router_ml/conf/policy/<name>.yaml``, shipped in the package):

- ``capability``: the seed article's table, task type -> model (+ max_tokens); unknown -> strongest.
- ``budget_ratio``: the seed's CostAwareRouter, expensive -> medium -> cheap as the budget is spent.
- ``cost_aware``: maximise quality - lambda * cost with lambda paced online so spend tracks a budget
  over a horizon, never crossing a hard cap.
- ``latency_aware``: the best model whose expected first-token and completion times meet the SLO.
- ``utility``: the hybrid; argmax quality - lambda * cost under a latency SLO, a per-request cost cap
  and per-task allowed models; one knob (``lam``, or ``target_quality``).
- baselines ``threshold`` (RouteLLM strong/weak), ``random``, ``zero`` (Zero router), ``oracle``.

Modules: ``base`` (the :class:`Policy` contract, SLO presets, :func:`replay`), ``rules``
(capability, latency_aware, budget_ratio), ``utility``, ``cost_aware``, ``baselines`` and
``registry`` (:data:`POLICIES`, :func:`build_policy`); every name is importable from here.
"""

from __future__ import annotations

from router_ml.decision.policies.base import (
    SLO_PRESETS,
    Policy,
    cheapest_model,
    latency_mask,
    replay,
    strongest_model,
)
from router_ml.decision.policies.baselines import (
    OraclePolicy,
    RandomPolicy,
    ThresholdPolicy,
    ZeroRouterPolicy,
)
from router_ml.decision.policies.cost_aware import CostAwarePolicy
from router_ml.decision.policies.registry import POLICIES, build_policy
from router_ml.decision.policies.rules import (
    SEED_CAPABILITY,
    BudgetRatioPolicy,
    CapabilityPolicy,
    LatencyAwarePolicy,
)
from router_ml.decision.policies.utility import UtilityPolicy

__all__ = [
    "POLICIES",
    "SEED_CAPABILITY",
    "SLO_PRESETS",
    "BudgetRatioPolicy",
    "CapabilityPolicy",
    "CostAwarePolicy",
    "LatencyAwarePolicy",
    "OraclePolicy",
    "Policy",
    "RandomPolicy",
    "ThresholdPolicy",
    "UtilityPolicy",
    "ZeroRouterPolicy",
    "build_policy",
    "cheapest_model",
    "latency_mask",
    "replay",
    "strongest_model",
]
