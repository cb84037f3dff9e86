"""Post-hoc calibration of per-model quality predictions, and calibration metrics.

Calibrators map predictions ``(n, m)`` to calibrated predictions ``(n, m)``, one map per model
column, fitted on held-out (prediction, outcome) pairs with NaN outcomes ignored. Both are
persisted as plain arrays and transform in numpy only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from router_ml.predictors.base import BasePredictor, check_state
from router_ml.predictors.mlp import sigmoid

if TYPE_CHECKING:
    import pandas as pd

_EPS = 1e-6


def _check_pair(pred: np.ndarray, target: np.ndarray, owner: str) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(
            f"{owner}: pred and target must be 2-D arrays of one shape, got {pred.shape}, {target.shape}"
        )
    return pred, target


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


class IsotonicCalibrator(BasePredictor):
    """Monotone (isotonic) map per model column; interpolates between fitted thresholds.

    State: ``x``/``y`` thresholds ``(m, L)`` padded with their last value, and ``counts (m,)``
    (valid entries per column; 0 = identity map for a column with no outcomes).
    """

    name = "isotonic"

    def fit(self, pred: np.ndarray, target: np.ndarray) -> IsotonicCalibrator:
        """Fit one isotonic regression per column on non-NaN pairs of ``pred``/``target (n, m)``."""
        from sklearn.isotonic import IsotonicRegression

        pred, target = _check_pair(pred, target, "IsotonicCalibrator")
        xs, ys = [], []
        for j in range(pred.shape[1]):
            ok = ~np.isnan(target[:, j]) & ~np.isnan(pred[:, j])
            if not ok.any():
                xs.append(np.zeros(0))
                ys.append(np.zeros(0))
                continue
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
                pred[ok, j], target[ok, j]
            )
            xs.append(np.asarray(iso.X_thresholds_, dtype=np.float64))
            ys.append(np.asarray(iso.y_thresholds_, dtype=np.float64))
        width = max(1, max(len(x) for x in xs))
        counts = np.array([len(x) for x in xs], dtype=np.int64)
        X = np.zeros((len(xs), width))
        Yt = np.zeros((len(xs), width))
        for j, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if len(x):
                X[j] = np.pad(x, (0, width - len(x)), mode="edge")
                Yt[j] = np.pad(y, (0, width - len(y)), mode="edge")
        self._set_state(X, Yt, counts)
        return self

    def _set_state(self, x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> None:
        self.x_thresholds_ = np.ascontiguousarray(x, dtype=np.float64)
        self.y_thresholds_ = np.ascontiguousarray(y, dtype=np.float64)
        self.counts_ = np.ascontiguousarray(counts, dtype=np.int64)
        self.n_models_ = int(self.counts_.shape[0])
        # every column's map in one np.interp call: column j's knots shifted by j * span, so the
        # columns' ranges never overlap; inputs are first clipped to their column's knot range
        # (np.interp's own clamping). One call instead of m keeps a one-prompt decision cheap.
        fitted = self.counts_ > 0
        first = self.x_thresholds_[:, 0].copy()
        last = self.x_thresholds_[np.arange(self.n_models_), np.maximum(self.counts_ - 1, 0)]
        span = float(np.ptp(np.r_[first[fitted], last[fitted]])) + 1.0 if fitted.any() else 1.0
        self._shift = np.arange(self.n_models_) * span
        self._lo, self._hi = np.where(fitted, first, -np.inf), np.where(fitted, last, np.inf)
        self._identity = None if fitted.all() else ~fitted
        self._knots_x = np.concatenate(
            [self.x_thresholds_[j, :c] + self._shift[j] for j, c in enumerate(self.counts_)]
        )
        self._knots_y = np.concatenate([self.y_thresholds_[j, :c] for j, c in enumerate(self.counts_)])

    def transform(self, pred: np.ndarray) -> np.ndarray:
        """Calibrated predictions, ``(n, m) -> (n, m)`` float64 in [0, 1]."""
        self._check_fitted("counts_")
        pred = np.asarray(pred, dtype=np.float64)
        if pred.ndim != 2 or pred.shape[1] != self.n_models_:
            raise ValueError(f"IsotonicCalibrator: expected shape (n, {self.n_models_}), got {pred.shape}")
        if not len(self._knots_x):
            return np.clip(pred, 0.0, 1.0)
        out = np.interp(np.clip(pred, self._lo, self._hi) + self._shift, self._knots_x, self._knots_y)
        if self._identity is not None:  # columns without outcomes keep their predictions
            out[:, self._identity] = pred[:, self._identity]
        return np.clip(out, 0.0, 1.0, out=out)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("counts_")
        return {
            "x_thresholds": self.x_thresholds_,
            "y_thresholds": self.y_thresholds_,
            "counts": self.counts_,
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> IsotonicCalibrator:
        owner = "IsotonicCalibrator"
        s = check_state(
            state, {"x_thresholds": (None, None), "y_thresholds": (None, None), "counts": (None,)}, owner
        )
        m, width = s["x_thresholds"].shape
        if s["y_thresholds"].shape != (m, width) or s["counts"].shape != (m,):
            raise ValueError(f"{owner}: inconsistent checkpoint shapes {[a.shape for a in s.values()]}")
        if (s["counts"] < 0).any() or (s["counts"] > width).any():
            raise ValueError(f"{owner}: counts must lie in [0, {width}]")
        self._set_state(s["x_thresholds"], s["y_thresholds"], s["counts"])
        return self


def _fit_platt(z: np.ndarray, y: np.ndarray, l2: float = 1e-4, iters: int = 100) -> tuple[float, float]:
    """Damped Newton for ``sigmoid(a z + b)`` against soft targets ``y`` (mean BCE + small L2 on a - 1)."""

    def loss(a: float, b: float) -> float:
        s = a * z + b
        return float((np.logaddexp(0.0, s) - y * s).mean() + 0.5 * l2 * (a - 1.0) ** 2)

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(iters):
        p = sigmoid(a * z + b)
        r = p - y
        g = np.array([(r * z).mean() + l2 * (a - 1.0), r.mean()])
        w = np.maximum(p * (1 - p), 1e-12)
        H = np.array([[(w * z * z).mean() + l2, (w * z).mean()], [(w * z).mean(), w.mean() + 1e-9]])
        step = np.linalg.solve(H, g)
        t = 1.0
        while t > 1e-8 and loss(a - t * step[0], b - t * step[1]) > current:
            t *= 0.5
        a, b = a - t * step[0], b - t * step[1]
        new = loss(a, b)
        if current - new < 1e-12:
            break
        current = new
    return float(a), float(b)


class TemperatureCalibrator(BasePredictor):
    """Per-model Platt/temperature scaling: ``sigmoid(a_m * logit(p) + b_m)``.

    State: ``a (m,)``, ``b (m,)``; a column with no outcomes keeps the identity (a=1, b=0).
    """

    name = "temperature"

    def fit(self, pred: np.ndarray, target: np.ndarray) -> TemperatureCalibrator:
        """Fit ``a_m, b_m`` by soft-label cross-entropy on non-NaN pairs of ``(n, m)`` arrays."""
        pred, target = _check_pair(pred, target, "TemperatureCalibrator")
        m = pred.shape[1]
        a, b = np.ones(m), np.zeros(m)
        for j in range(m):
            ok = ~np.isnan(target[:, j]) & ~np.isnan(pred[:, j])
            if ok.sum() >= 2:
                a[j], b[j] = _fit_platt(_logit(pred[ok, j]), np.clip(target[ok, j], 0.0, 1.0))
        self.a_, self.b_ = a, b
        self.n_models_ = m
        return self

    def transform(self, pred: np.ndarray) -> np.ndarray:
        """Calibrated predictions, ``(n, m) -> (n, m)`` float64 in [0, 1]."""
        self._check_fitted("a_")
        pred = np.asarray(pred, dtype=np.float64)
        if pred.ndim != 2 or pred.shape[1] != self.n_models_:
            raise ValueError(f"TemperatureCalibrator: expected shape (n, {self.n_models_}), got {pred.shape}")
        return sigmoid(self.a_ * _logit(pred) + self.b_)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("a_")
        return {"a": self.a_, "b": self.b_}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> TemperatureCalibrator:
        s = check_state(state, {"a": (None,), "b": (None,)}, "TemperatureCalibrator")
        if s["a"].shape != s["b"].shape:
            raise ValueError(f"TemperatureCalibrator: a {s['a'].shape} and b {s['b'].shape} differ in shape")
        self.a_ = np.ascontiguousarray(s["a"], dtype=np.float64)
        self.b_ = np.ascontiguousarray(s["b"], dtype=np.float64)
        self.n_models_ = int(self.a_.shape[0])
        return self


def _pooled(pred: np.ndarray, target: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).ravel()
    target = np.asarray(target, dtype=np.float64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in size: {pred.size} vs {target.size}")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    ok = ~np.isnan(pred) & ~np.isnan(target)
    p, t = pred[ok], target[ok]
    bins = np.minimum((np.clip(p, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)
    return p, t, bins


def expected_calibration_error(pred: np.ndarray, target: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error (Naeini et al., 2015; Guo et al., 2017), all models pooled.

    Equal-width bins on the prediction in [0, 1]; ECE = sum over bins of
    ``(count_b / N) * |mean pred_b - mean target_b|``. Works for 0/1 and continuous targets;
    pairs with a NaN prediction or target are ignored. ``pred``, ``target``: same shape, e.g. ``(n, m)``.
    """
    p, t, bins = _pooled(pred, target, n_bins)
    if p.size == 0:
        return float("nan")
    sp = np.bincount(bins, weights=p, minlength=n_bins)
    st = np.bincount(bins, weights=t, minlength=n_bins)
    return float(np.abs(sp - st).sum() / p.size)


def reliability_curve(pred: np.ndarray, target: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """Per-bin reliability table for plots: columns ``bin, mean_pred, mean_target, count``.

    One row per equal-width bin (``n_bins`` rows); empty bins have count 0 and NaN means.
    """
    import pandas as pd

    p, t, bins = _pooled(pred, target, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(bins, weights=p, minlength=n_bins) / count
        mean_target = np.bincount(bins, weights=t, minlength=n_bins) / count
    return pd.DataFrame(
        {"bin": np.arange(n_bins), "mean_pred": mean_pred, "mean_target": mean_target, "count": count}
    )
