"""The decision layer: pick one model per request under cost, latency and budget constraints.

- :mod:`~router_ml.decision.spec`: the model pool (prices, local GPU-hour cost, latency priors).
- :mod:`~router_ml.decision.costs`: token counts, expected output length, expected $ per call.
- :mod:`~router_ml.decision.latency`: time to first token and decode speed, priors and live estimates.
- :mod:`~router_ml.decision.policies`: capability, budget_ratio, cost_aware (paced), latency_aware,
  utility (hybrid) and the baselines threshold, random, zero and oracle.
- :mod:`~router_ml.decision.ledger`: the persistent spend ledger (SQLite) behind budgets.
- :mod:`~router_ml.decision.layer`: :class:`DecisionLayer`, what ``LearnedRouter.route(policy=...)`` takes.
"""

from router_ml.decision.base import BudgetExhausted, Estimates, PolicyError, RoutingDecision
from router_ml.decision.layer import DecisionLayer
from router_ml.decision.policies import POLICIES, SLO_PRESETS, Policy, build_policy, replay
from router_ml.decision.spec import ModelPool, ModelSpec

__all__ = [
    "POLICIES",
    "SLO_PRESETS",
    "BudgetExhausted",
    "DecisionLayer",
    "Estimates",
    "ModelPool",
    "ModelSpec",
    "Policy",
    "PolicyError",
    "RoutingDecision",
    "build_policy",
    "replay",
]
