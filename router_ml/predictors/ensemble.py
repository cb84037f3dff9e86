"""An ensemble of quality heads: the weighted mean of its members' predicted qualities.

Members are embedding-only heads of the registry (``taskmix``, ``knn``, ``linear``, ``mlp``,
``mf``), each given as ``{"name": ..., "params": {...}}``; every member is fitted on the same rows
and the ensemble predicts ``sum_i w_i q_i / sum_i w_i``. Averaging heads that err differently
(a task mixture that maps a prompt onto known task types, a kNN that reads its nearest
neighbours) is the cheapest variance reduction there is; whether it pays under shift is measured
by the shift harness (README, "Routing under shift"). A member may read encoder layer states
(``taskmix`` with ``layers``): the ensemble's :attr:`layers` are their union and each member gets
its own columns. State: each member's arrays under ``"<i>.<key>"``, no pickle.

    head = EnsembleQualityPredictor(members=[{"name": "taskmix"}, {"name": "knn", "params": {"k": 100}}])
    head.fit(X, Y, task_ids).predict(X_new)  # (n, m)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from router_ml.predictors.base import QualityPredictor

DEFAULT_MEMBERS: tuple[dict[str, Any], ...] = (
    {"name": "taskmix", "params": {}},
    {"name": "knn", "params": {"k": 100, "weights": "distance"}},
)


class EnsembleQualityPredictor(QualityPredictor):
    """Weighted mean of member quality heads (module doc). Params: ``members`` (list of
    ``{"name", "params"}``), ``weights`` (one per member; None = equal)."""

    name = "ensemble"

    def __init__(
        self, members: Sequence[Mapping[str, Any]] | None = None, weights: Sequence[float] | None = None
    ) -> None:
        self.members = [dict(m) for m in (members if members is not None else DEFAULT_MEMBERS)]
        self.weights = None if weights is None else [float(w) for w in weights]

    def _build_members(self) -> list[QualityPredictor]:
        from router_ml.predictors import QUALITY_PREDICTORS, build_quality_predictor

        if not self.members:
            raise ValueError("EnsembleQualityPredictor: members must name at least one head")
        if self.weights is not None and (
            len(self.weights) != len(self.members) or min(self.weights) < 0 or sum(self.weights) <= 0
        ):
            raise ValueError(
                f"EnsembleQualityPredictor: weights {self.weights} must be one non-negative weight per "
                f"member ({len(self.members)}), not all zero"
            )
        heads = []
        for i, m in enumerate(self.members):
            name = m.get("name")
            if name == self.name or name not in QUALITY_PREDICTORS:
                raise ValueError(
                    f"EnsembleQualityPredictor: member {i} has unknown head {name!r}; known: "
                    f"{sorted(set(QUALITY_PREDICTORS) - {self.name})}"
                )
            head = build_quality_predictor(name, **dict(m.get("params") or {}))
            if head.uses_text:
                raise ValueError(f"EnsembleQualityPredictor: member {i} ({name}) reads the prompt text; "
                                 "members must be embedding-only heads")  # fmt: skip
            heads.append(head)
        return heads

    @property
    def layers(self) -> list[int]:  # type: ignore[override]
        """The union of the members' encoder layers (sorted): what ``X`` holds after the embedding."""
        return sorted({int(k) for m in self.members for k in (m.get("params") or {}).get("layers") or ()})

    def _columns(self, X: np.ndarray) -> list[np.ndarray]:
        """Each member's view of ``X`` (the embedding and that member's layer states)."""
        from router_ml.embeddings.base import layer_columns

        have = self.layers
        dim = X.shape[1] // (1 + len(have))
        return [
            X if list(h.layers) == have else X[:, layer_columns(have, h.layers, dim)] for h in self.heads_
        ]

    def _w(self) -> np.ndarray:
        w = np.ones(len(self.members)) if self.weights is None else np.asarray(self.weights, np.float64)
        return w / w.sum()

    def fit(
        self, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None = None
    ) -> EnsembleQualityPredictor:
        """Fit every member on ``X (n, d)``, ``Y (n, m)`` and ``task_ids`` (for members that read them)."""
        X, Y, task_ids = self._check_fit_inputs(X, Y, task_ids)
        self.heads_ = self._build_members()
        for h, Xh in zip(self.heads_, self._columns(X), strict=True):
            h.fit(Xh, Y, task_ids)
        self.n_models_, self.dim_ = Y.shape[1], X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Weighted mean of the members' ``(n, m)`` predictions."""
        X = self._check_X(X)
        return sum(
            w * h.predict(Xh) for w, h, Xh in zip(self._w(), self.heads_, self._columns(X), strict=True)
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("heads_")
        out = {"shape": np.asarray([self.n_models_, self.dim_])}
        for i, h in enumerate(self.heads_):
            out.update({f"{i}.{k}": v for k, v in h.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> EnsembleQualityPredictor:
        if "shape" not in state:
            raise ValueError("EnsembleQualityPredictor: state has no 'shape'")
        heads = self._build_members()
        known = {f"{i}." for i in range(len(heads))}
        stray = sorted(k for k in state if k != "shape" and k.split(".", 1)[0] + "." not in known)
        if stray:
            raise ValueError(f"EnsembleQualityPredictor: unexpected array(s) {stray} in the state")
        loaded = []
        for i, h in enumerate(heads):
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}.")}
            if not sub:
                raise ValueError(f"EnsembleQualityPredictor: state has no arrays for member {i} ({h.name})")
            try:
                loaded.append(h.load_state_dict(sub))
            except (ValueError, KeyError) as e:
                msg = str(e)  # name the arrays as they are stored here: '<i>.<key>'
                for k in sorted(sub, key=len, reverse=True):
                    msg = msg.replace(f"'{k}'", f"'{i}.{k}'")
                raise ValueError(f"EnsembleQualityPredictor: member {i} ({h.name}): {msg}") from e
        self.heads_ = loaded
        self.n_models_, self.dim_ = (int(v) for v in np.asarray(state["shape"]).ravel()[:2])
        return self
