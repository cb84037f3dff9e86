"""The policy registry: ``router_ml/conf/policy/<name>.yaml`` name -> class, and :func:`build_policy`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router_ml.decision.base import PolicyError
from router_ml.decision.policies.base import Policy
from router_ml.decision.policies.baselines import (
    OraclePolicy,
    RandomPolicy,
    ThresholdPolicy,
    ZeroRouterPolicy,
)
from router_ml.decision.policies.cost_aware import CostAwarePolicy
from router_ml.decision.policies.rules import BudgetRatioPolicy, CapabilityPolicy, LatencyAwarePolicy
from router_ml.decision.policies.utility import UtilityPolicy

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
    """A policy from ``{"name": ..., **params}`` (a ``router_ml/conf/policy`` entry) or a bare name."""
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
