"""Evaluation: routing quality against single models, random and the oracle; later cost frontiers."""

from router_ml.evaluation.metrics import (
    best_single_model,
    gap_closed,
    oracle_scores,
    paired_bootstrap,
    random_scores,
    routed_scores,
)

__all__ = [
    "best_single_model",
    "gap_closed",
    "oracle_scores",
    "paired_bootstrap",
    "random_scores",
    "routed_scores",
]
