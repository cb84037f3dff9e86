"""Predictors: the task-type head, per-model quality heads and their calibrators.

Registries keyed by the conf YAML stem (``conf/predictor/<name>.yaml``)::

    head = build_quality_predictor("mlp", hidden=[256])
    head.fit(X, Y, task_ids).predict(X_new)          # (n, m) expected quality in [0, 1]

Heads: ``knn``, ``linear``, ``mlp``, ``mf``, ``ensemble`` (the weighted mean of such heads) and ``taskmix`` (needs ``task_ids``; best with
fine-grained source-task ids; a head whose ``uses_text`` is true also takes ``texts=`` in ``fit``
and ``predict``); ``probed`` wraps any fitted head with model columns added from a few probe
outcomes (:mod:`router_ml.predictors.probed`). Calibrators: ``isotonic``, ``temperature``.

Importing this package is light: torch and scikit-learn are imported inside ``fit``.
"""

from __future__ import annotations

from typing import Any

from router_ml.predictors.base import BasePredictor, NotFittedError, QualityPredictor
from router_ml.predictors.calibration import (
    IsotonicCalibrator,
    TemperatureCalibrator,
    expected_calibration_error,
    reliability_curve,
)
from router_ml.predictors.ensemble import EnsembleQualityPredictor
from router_ml.predictors.knn import KnnQualityPredictor
from router_ml.predictors.linear import LinearQualityPredictor
from router_ml.predictors.mf import MfQualityPredictor
from router_ml.predictors.mlp import MlpQualityPredictor
from router_ml.predictors.probed import ProbedQualityPredictor
from router_ml.predictors.task import TaskClassifier
from router_ml.predictors.taskmix import TaskMixtureQualityPredictor

QUALITY_PREDICTORS: dict[str, type[QualityPredictor]] = {
    cls.name: cls
    for cls in (
        KnnQualityPredictor,
        LinearQualityPredictor,
        MlpQualityPredictor,
        MfQualityPredictor,
        TaskMixtureQualityPredictor,
        EnsembleQualityPredictor,
    )
}
#: every head a checkpoint may hold: the trainable ones and a head grown from probes (built by
#: ``ProbedQualityPredictor.from_head`` / ``add_model``, never trained from a config)
QUALITY_HEADS: dict[str, type[QualityPredictor]] = {
    **QUALITY_PREDICTORS,
    ProbedQualityPredictor.name: ProbedQualityPredictor,
}
CALIBRATORS: dict[str, type[BasePredictor]] = {
    cls.name: cls for cls in (IsotonicCalibrator, TemperatureCalibrator)
}


def _build(registry: dict[str, type[BasePredictor]], kind: str, name: str, params: dict[str, Any]) -> Any:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(registry)}")
    cls = registry[name]
    valid = cls().get_params()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"{kind} {name!r}: unknown parameter(s) {unknown}; valid: {sorted(valid)}")
    return cls(**params)


def build_quality_predictor(name: str, **params: Any) -> QualityPredictor:
    """A quality head from its registry key and constructor params (e.g. from ``router.json``)."""
    return _build(QUALITY_PREDICTORS, "quality predictor", name, params)


def build_calibrator(name: str, **params: Any) -> BasePredictor:
    """A calibrator (``"isotonic"`` or ``"temperature"``) from its registry key."""
    return _build(CALIBRATORS, "calibrator", name, params)


__all__ = [
    "CALIBRATORS",
    "QUALITY_HEADS",
    "QUALITY_PREDICTORS",
    "BasePredictor",
    "EnsembleQualityPredictor",
    "IsotonicCalibrator",
    "KnnQualityPredictor",
    "LinearQualityPredictor",
    "MfQualityPredictor",
    "MlpQualityPredictor",
    "NotFittedError",
    "ProbedQualityPredictor",
    "QualityPredictor",
    "TaskClassifier",
    "TaskMixtureQualityPredictor",
    "TemperatureCalibrator",
    "build_calibrator",
    "build_quality_predictor",
    "expected_calibration_error",
    "reliability_curve",
]
