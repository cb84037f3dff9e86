"""Matrix-factorisation quality head: RouteLLM's MF router generalised to N models.

``score(x, m) = sigmoid(<W x, v_m> + b_m)`` with a learned projection ``W (k, d)`` of the
(standardised) prompt embedding, model embeddings ``V (m, k)`` and biases ``b (m,)``; trained
with masked soft-label BCE in torch (shared loop from :mod:`router_ml.predictors.mlp`),
inference in numpy. :meth:`MfQualityPredictor.add_model` adds a new model from a few probe
outcomes by fitting only its ``v`` and ``b`` (the prompt side stays frozen).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from router_ml.predictors.base import QualityPredictor, check_state, state_size
from router_ml.predictors.mlp import init_output_bias, sigmoid, train_masked_bce


def _build_mf(dim: int, k: int, n_models: int, n_tasks: int) -> Any:
    import torch
    from torch import nn

    class _Mf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(dim, k, bias=False)
            self.models = nn.Linear(k, n_models)  # weight = V (m, k), bias = b (m,)
            self.aux = nn.Linear(k, n_tasks) if n_tasks > 0 else None

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            z = self.proj(x)
            return self.models(z), (self.aux(z) if self.aux is not None else None)

    return _Mf()


class MfQualityPredictor(QualityPredictor):
    """Prompt x model matrix factorisation (see module docstring).

    ``dim``: latent size k. ``l2``: penalty ``l2 * (|W|^2 + |V|^2)`` added to the loss (the
    factorised analogue of a linear model's L2; on routing data it matters far more than early
    stopping). Inputs are centred and divided by one global scale. ``aux_task_weight``/``n_tasks``:
    optional task-type head on the projected prompt (ignored when ``task_ids`` is None).
    ``val_fraction``/``patience``: early stopping with best-epoch restore. ``probe_l2``: pull of a
    new model's ``(v, b)`` towards the mean existing model in :meth:`add_model`.
    """

    name = "mf"

    def __init__(
        self,
        dim: int = 16,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        epochs: int = 80,
        batch_size: int = 256,
        seed: int = 0,
        aux_task_weight: float = 0.0,
        n_tasks: int = 6,
        val_fraction: float = 0.1,
        patience: int = 10,
        l2: float = 3e-3,
        probe_l2: float = 1.0,
    ) -> None:
        self.dim = dim
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.aux_task_weight = aux_task_weight
        self.n_tasks = n_tasks
        self.val_fraction = val_fraction
        self.patience = patience
        self.l2 = l2
        self.probe_l2 = probe_l2

    def fit(self, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None = None) -> MfQualityPredictor:
        """Train on ``X (n, d)``, ``Y (n, m)`` (NaN = no outcome), optional ``task_ids (n,)``."""
        import torch

        X, Y, task_ids = self._check_fit_inputs(X, Y, task_ids)
        task_ids = self._aux_task_ids(task_ids)
        # centre, then one global scale (per-dimension scaling inflates noise directions)
        mean = X.mean(axis=0)
        scale = np.full(X.shape[1], np.sqrt(((X - mean) ** 2).sum(axis=1).mean() / X.shape[1]) + 1e-12)
        Xs = ((X - mean) / scale).astype(np.float32)
        torch.manual_seed(int(self.seed))
        module = _build_mf(X.shape[1], int(self.dim), Y.shape[1], int(self.n_tasks))
        init_output_bias(module.models, Y)
        l2 = float(self.l2)

        def penalty() -> Any:
            return l2 * (module.proj.weight.square().sum() + module.models.weight.square().sum())

        self.history_ = train_masked_bce(
            module,
            Xs,
            Y,
            task_ids,
            aux_task_weight=float(self.aux_task_weight),
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            val_fraction=float(self.val_fraction),
            patience=int(self.patience),
            seed=int(self.seed),
            penalty=penalty if l2 > 0 else None,
        )
        self._set_state(
            mean,
            scale,
            module.proj.weight.detach().numpy(),
            module.models.weight.detach().numpy(),
            module.models.bias.detach().numpy(),
        )
        self.module_ = module
        return self

    def _set_state(self, mean: Any, scale: Any, W: Any, V: Any, b: Any) -> None:
        self.x_mean_ = np.ascontiguousarray(mean, dtype=np.float32)
        self.x_scale_ = np.ascontiguousarray(scale, dtype=np.float32)
        self.W_ = np.ascontiguousarray(W, dtype=np.float32)
        self.V_ = np.ascontiguousarray(V, dtype=np.float32)
        self.b_ = np.ascontiguousarray(b, dtype=np.float32)
        self._W_t = np.ascontiguousarray(self.W_.T)
        self._V_t = np.ascontiguousarray(self.V_.T)
        self.dim_ = int(self.W_.shape[1])
        self.n_models_ = int(self.V_.shape[0])

    def prompt_embedding(self, X: np.ndarray) -> np.ndarray:
        """Projected prompts ``W x``: ``(n, d) -> (n, k)`` float32."""
        return ((self._check_X(X) - self.x_mean_) / self.x_scale_) @ self._W_t

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Expected score per model, ``(n, d) -> (n, m)`` float64 in [0, 1]."""
        return sigmoid(self.prompt_embedding(X) @ self._V_t + self.b_)

    def add_model(self, X_probe: np.ndarray, y_probe: np.ndarray) -> int:
        """Add a model from probe outcomes ``y_probe (p,)`` in [0, 1] on prompts ``X_probe (p, d)``.

        Fits only the new ``v (k,)`` and ``b`` (Newton's method on soft-label BCE with an L2 pull
        of strength ``probe_l2`` towards the mean existing model); returns the new column index.
        """
        Z = self.prompt_embedding(X_probe).astype(np.float64)
        y = np.asarray(y_probe, dtype=np.float64).ravel()
        if y.shape[0] != Z.shape[0]:
            raise ValueError(f"add_model: {Z.shape[0]} probe prompts but {y.shape[0]} outcomes")
        ok = ~np.isnan(y)
        if not ok.any() or (y[ok] < 0).any() or (y[ok] > 1).any():
            raise ValueError("add_model: y_probe needs at least one outcome, all in [0, 1]")
        A = np.hstack([Z[ok], np.ones((ok.sum(), 1))])  # (p, k + 1)
        prior = np.concatenate([self.V_.mean(axis=0), [self.b_.mean()]]).astype(np.float64)
        lam = float(self.probe_l2) / max(int(ok.sum()), 1)
        theta = prior.copy()
        for _ in range(50):
            p = sigmoid(A @ theta)
            grad = A.T @ (p - y[ok]) / len(p) + lam * (theta - prior)
            H = (A * (p * (1 - p))[:, None]).T @ A / len(p) + lam * np.eye(len(theta))
            step = np.linalg.solve(H, grad)
            theta -= step
            if np.abs(step).max() < 1e-9:
                break
        V = np.vstack([self.V_, theta[None, :-1]])
        b = np.append(self.b_, theta[-1])
        self._set_state(self.x_mean_, self.x_scale_, self.W_, V, b)
        return self.n_models_ - 1

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("W_")
        return {"x_mean": self.x_mean_, "x_scale": self.x_scale_, "W": self.W_, "V": self.V_, "b": self.b_}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> MfQualityPredictor:
        k = int(self.dim)
        d, m = state_size(state, "x_mean", 0), state_size(state, "b", 0)
        shapes = {"x_mean": (d,), "x_scale": (d,), "W": (k, d), "V": (m, k), "b": (m,)}
        s = check_state(state, shapes, "MfQualityPredictor")
        self._set_state(s["x_mean"], s["x_scale"], s["W"], s["V"], s["b"])
        return self
