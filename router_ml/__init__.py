"""router-ml: a learned LLM router.

Public API (imported lazily so ``import router_ml`` stays light)::

    from router_ml import LearnedRouter, RoutingDecision
    router = LearnedRouter.from_pretrained("runs/latest/checkpoint")
    router.route("Summarise this email ...").model
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LearnedRouter", "RoutingDecision", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("LearnedRouter", "RoutingDecision"):
        from router_ml import router

        return getattr(router, name)
    raise AttributeError(f"module 'router_ml' has no attribute {name!r}")
