"""k-nearest-neighbour quality head: cosine similarity on normalised prompt embeddings.

RouterBench's baseline (Hu et al., 2024) and the field's strong baseline: a prompt's expected
score for a model is the (weighted) mean of that model's scores on the ``k`` most similar
training prompts. Inference is numpy only: one ``(n, N)`` matrix product plus a partial sort.
"""

from __future__ import annotations

import numpy as np

from router_ml.predictors.base import QualityPredictor, as_float_matrix, check_state, few_rows_blas

_WEIGHTS = ("uniform", "distance", "softmax")


def _normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); ``(n, d)`` float32."""
    # what np.linalg.norm(X, axis=1, keepdims=True) computes for real rows, without its checks
    norms = np.sqrt(np.add.reduce(X * X, axis=1, keepdims=True))
    return (X / np.maximum(norms, 1e-12)).astype(np.float32)


class KnnQualityPredictor(QualityPredictor):
    """Mean score of the ``k`` nearest training prompts (cosine), NaN-aware.

    ``weights``: ``"uniform"`` (plain mean), ``"distance"`` (1 / cosine distance) or
    ``"softmax"`` (``exp(similarity / temperature)``). A model with no observed score among the
    neighbours falls back to its training column mean.
    """

    name = "knn"

    def __init__(self, k: int = 100, weights: str = "distance", temperature: float = 0.05) -> None:
        self.k = k
        self.weights = weights
        self.temperature = temperature

    def _check_params(self) -> None:
        if self.weights not in _WEIGHTS:
            raise ValueError(f"KnnQualityPredictor: weights must be one of {_WEIGHTS}, got {self.weights!r}")
        if int(self.k) < 1:
            raise ValueError(f"KnnQualityPredictor: k must be >= 1, got {self.k}")
        if self.weights == "softmax" and not self.temperature > 0:
            raise ValueError(f"KnnQualityPredictor: temperature must be > 0, got {self.temperature}")

    def fit(self, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None = None) -> KnnQualityPredictor:
        """Store normalised ``X (n, d)`` and scores ``Y (n, m)``; ``task_ids`` is unused."""
        self._check_params()
        X, Y, _ = self._check_fit_inputs(X, Y, task_ids)
        self._set_state(_normalise(X), Y, np.nanmean(Y, axis=0))
        return self

    def _set_state(self, X: np.ndarray, Y: np.ndarray, col_mean: np.ndarray) -> None:
        self.X_train_ = np.ascontiguousarray(X, dtype=np.float32)
        self.Y_train_ = np.ascontiguousarray(Y, dtype=np.float64)
        self.col_mean_ = np.ascontiguousarray(col_mean, dtype=np.float64)
        self.n_models_ = int(Y.shape[1])
        self.dim_ = int(X.shape[1])
        self._complete = not np.isnan(self.Y_train_).any()  # every outcome known: plain weighted means

    def neighbours(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices ``(n, k)`` of the nearest training rows and their cosine similarities ``(n, k)``."""
        Xq = _normalise(self._check_X(X))
        with few_rows_blas(Xq.shape[0]):
            sims = Xq @ self.X_train_.T  # (n, N)
        N = sims.shape[1]
        k = min(int(self.k), N)
        if k < N:
            idx = np.argpartition(sims, N - k, axis=1)[:, N - k :]
        else:
            idx = np.broadcast_to(np.arange(k), (sims.shape[0], k))
        if sims.shape[0] == 1:  # = take_along_axis(sims, idx, axis=1), without its index building
            return idx, sims[0][idx]
        return idx, np.take_along_axis(sims, idx, axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Expected score per model, ``(n, d) -> (n, m)`` float64 in [0, 1]."""
        idx, sims = self.neighbours(X)
        sims = sims.astype(np.float64)
        if self.weights == "uniform":
            w = np.ones_like(sims)
        elif self.weights == "distance":
            w = 1.0 / np.maximum(1.0 - sims, 1e-6)
        else:
            w = np.exp((sims - sims.max(axis=1, keepdims=True)) / float(self.temperature))
        Yn = self.Y_train_[idx]  # (n, k, m)
        if self._complete:  # no NaN to mask (weights are > 0, so the denominator is too)
            out = np.einsum("nk,nkm->nm", w, Yn) / w.sum(axis=1, keepdims=True)
            return np.clip(out, 0.0, 1.0, out=out)
        seen = ~np.isnan(Yn)
        wk = w[:, :, None] * seen
        num = np.einsum("nkm,nkm->nm", wk, np.where(seen, Yn, 0.0))
        den = wk.sum(axis=1)
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), self.col_mean_[None, :])
        return np.clip(out, 0.0, 1.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("X_train_")
        return {"X_train": self.X_train_, "Y_train": self.Y_train_, "col_mean": self.col_mean_}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> KnnQualityPredictor:
        self._check_params()
        s = check_state(
            state,
            {"X_train": (None, None), "Y_train": (None, None), "col_mean": (None,)},
            "KnnQualityPredictor",
        )
        n, m = s["Y_train"].shape
        if s["X_train"].shape[0] != n or s["col_mean"].shape != (m,):
            raise ValueError(
                f"KnnQualityPredictor: inconsistent checkpoint shapes X_train {s['X_train'].shape}, "
                f"Y_train {s['Y_train'].shape}, col_mean {s['col_mean'].shape}"
            )
        as_float_matrix(s["X_train"], "KnnQualityPredictor")
        self._set_state(s["X_train"], s["Y_train"], s["col_mean"])
        return self
