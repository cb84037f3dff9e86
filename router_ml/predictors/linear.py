"""Linear quality heads: one ridge or soft-label logistic regression per model.

Each model's head is fitted only on the rows where that model has an outcome (NaN rows are
masked out). Inference is a single ``(n, d) @ (d, m)`` product in numpy.
"""

from __future__ import annotations

import numpy as np

from router_ml.predictors.base import QualityPredictor, check_state

_KINDS = ("ridge", "logistic")


def _ridge(X: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Closed-form ridge with an unpenalised intercept; ``X (n, d)``, ``y (n,)`` -> ``w (d,)``, ``b``."""
    mu = X.mean(axis=0)
    ym = float(y.mean())
    Xc = X - mu
    A = Xc.T @ Xc + alpha * np.eye(X.shape[1])
    w = np.linalg.solve(A, Xc.T @ (y - ym))
    return w, ym - float(mu @ w)


def _soft_logistic(X: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    """Logistic regression on soft labels ``y in [0, 1]``.

    A soft label is the exact cross-entropy target ``y log p + (1 - y) log(1 - p)``; sklearn takes
    it as two weighted copies of each row (label 1 with weight ``y``, label 0 with weight
    ``1 - y``), which minimises the same loss. Returns ``w (d,)``, ``b``.
    """
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():  # one outcome everywhere: a constant head
        p = float(np.clip(y[0], 1e-4, 1 - 1e-4))
        return np.zeros(X.shape[1]), float(np.log(p / (1 - p)))
    n = X.shape[0]
    Xd = np.concatenate([X, X])
    yd = np.concatenate([np.ones(n), np.zeros(n)])
    sw = np.concatenate([y, 1.0 - y])
    keep = sw > 0
    clf = LogisticRegression(C=C, max_iter=1000, tol=1e-6)
    clf.fit(Xd[keep], yd[keep], sample_weight=sw[keep])
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


class LinearQualityPredictor(QualityPredictor):
    """One linear head per model: ``kind="ridge"`` (L2 ``alpha``, output clipped to [0, 1]) or
    ``kind="logistic"`` (soft-label logistic regression, inverse L2 strength ``C``, sigmoid output)."""

    name = "linear"

    def __init__(self, alpha: float = 30.0, kind: str = "ridge", C: float = 0.3) -> None:
        self.alpha = alpha
        self.kind = kind
        self.C = C

    def fit(self, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None = None) -> LinearQualityPredictor:
        """Fit ``m`` heads on ``X (n, d)``, ``Y (n, m)`` (NaN rows masked per model); ``task_ids`` unused."""
        if self.kind not in _KINDS:
            raise ValueError(f"LinearQualityPredictor: kind must be one of {_KINDS}, got {self.kind!r}")
        X, Y, _ = self._check_fit_inputs(X, Y, task_ids)
        X64 = X.astype(np.float64)
        m = Y.shape[1]
        W = np.zeros((m, X.shape[1]))
        b = np.zeros(m)
        for j in range(m):
            rows = ~np.isnan(Y[:, j])
            if self.kind == "ridge":
                W[j], b[j] = _ridge(X64[rows], Y[rows, j], float(self.alpha))
            else:
                W[j], b[j] = _soft_logistic(X64[rows], Y[rows, j], float(self.C))
        self._set_state(W, b)
        return self

    def _set_state(self, W: np.ndarray, b: np.ndarray) -> None:
        self.coef_ = np.ascontiguousarray(W, dtype=np.float64)
        self.intercept_ = np.ascontiguousarray(b, dtype=np.float64)
        self._coef_t = np.ascontiguousarray(self.coef_.T)
        self.n_models_, self.dim_ = (int(s) for s in self.coef_.shape)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Expected score per model, ``(n, d) -> (n, m)`` float64 in [0, 1]."""
        z = self._check_X(X).astype(np.float64) @ self._coef_t + self.intercept_
        if self.kind == "logistic":
            return 1.0 / (1.0 + np.exp(-z))
        return np.clip(z, 0.0, 1.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("coef_")
        return {"coef": self.coef_, "intercept": self.intercept_}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> LinearQualityPredictor:
        s = check_state(state, {"coef": (None, None), "intercept": (None,)}, "LinearQualityPredictor")
        if s["intercept"].shape[0] != s["coef"].shape[0]:
            raise ValueError(
                f"LinearQualityPredictor: intercept shape {s['intercept'].shape} does not match "
                f"coef shape {s['coef'].shape}"
            )
        self._set_state(s["coef"], s["intercept"])
        return self
