"""MLP quality head: a shared trunk with one sigmoid output per model, trained in torch.

Loss: masked binary cross-entropy on soft labels (scores in [0, 1]; NaN = no outcome), plus an
optional auxiliary task-type head (cross-entropy on ``task_ids``, weight ``aux_task_weight``)
that shapes the trunk. Early stopping on a seeded internal validation split restores the best
epoch; ``n_members`` such networks are averaged. Training imports torch lazily; inference is
numpy from the stored weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from router_ml.predictors.base import QualityPredictor, check_state, state_size


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def init_output_bias(layer: Any, Y: np.ndarray) -> None:
    """Start a sigmoid output layer at the column means: ``bias = logit(nanmean(Y, 0))``."""
    import torch

    p = np.clip(np.nanmean(Y, axis=0), 1e-3, 1 - 1e-3)
    with torch.no_grad():
        layer.bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=layer.bias.dtype))


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded row split ``(train_idx, val_idx)``; no validation rows for tiny sets or fraction 0."""
    n_val = round(n * float(val_fraction))
    if n_val < 1 or n - n_val < 1:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def train_masked_bce(
    module: Any, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None, **kw: Any
) -> dict:
    """Train ``module(x) -> (logits (b, m), aux_logits (b, t) | None)`` with masked soft-label BCE.

    ``X (n, d)``, ``Y (n, m)`` with NaN = no outcome, ``task_ids (n,)`` or None. Keyword arguments:
    ``aux_task_weight, lr, weight_decay, epochs, batch_size, val_fraction, patience, seed`` and
    optional ``penalty`` (callable returning a scalar tensor added to each training batch's loss).
    AdamW, seeded shuffling, early stopping on the validation BCE with best-epoch restore (in
    place). Runs single-threaded: these small layers gain nothing from more threads, and on a
    busy machine torch's thread pool slows training by an order of magnitude.
    Returns ``{"best_epoch", "best_val", "epochs_run"}``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(module, X, Y, task_ids, **kw)
    finally:
        torch.set_num_threads(threads)


def _train(
    module: Any,
    X: np.ndarray,
    Y: np.ndarray,
    task_ids: np.ndarray | None,
    *,
    aux_task_weight: float,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    val_fraction: float,
    patience: int,
    seed: int,
    penalty: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    tr, va = split_train_val(X.shape[0], val_fraction, seed)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    Mt = torch.as_tensor(~np.isnan(Y), dtype=torch.float32)
    Yt = torch.as_tensor(np.nan_to_num(Y, nan=0.0), dtype=torch.float32)
    Tt = None if task_ids is None else torch.as_tensor(task_ids, dtype=torch.long)
    use_aux = Tt is not None and aux_task_weight > 0

    def loss_on(idx: torch.Tensor, train: bool) -> torch.Tensor:
        logits, aux = module(Xt[idx])
        mask = Mt[idx]
        bce = F.binary_cross_entropy_with_logits(logits, Yt[idx], weight=mask, reduction="sum")
        loss = bce / mask.sum().clamp_min(1.0)
        if train and use_aux and aux is not None:
            loss = loss + aux_task_weight * F.cross_entropy(aux, Tt[idx])
        if train and penalty is not None:
            loss = loss + penalty()
        return loss

    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
    best = {"best_epoch": -1, "best_val": float("inf"), "epochs_run": 0}
    best_state = None
    stale = 0
    for epoch in range(int(epochs)):
        module.train()
        order = tr_t[torch.randperm(len(tr_t), generator=gen)]
        for start in range(0, len(order), int(batch_size)):
            opt.zero_grad()
            loss_on(order[start : start + int(batch_size)], train=True).backward()
            opt.step()
        best["epochs_run"] = epoch + 1
        if len(va) == 0:
            continue
        module.eval()
        with torch.no_grad():
            val = float(loss_on(va_t, train=False))
        if val < best["best_val"] - 1e-6:
            best.update(best_epoch=epoch, best_val=val)
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            stale = 0
        else:
            stale += 1
            if stale >= int(patience):
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return best


def _build_mlp(dim: int, hidden: Sequence[int], n_models: int, n_tasks: int, dropout: float) -> Any:
    import torch
    from torch import nn

    class _Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            prev = dim
            for h in hidden:
                layers += [nn.Linear(prev, int(h)), nn.ReLU(), nn.Dropout(dropout)]
                prev = int(h)
            self.trunk = nn.Sequential(*layers)
            self.out = nn.Linear(prev, n_models)
            self.aux = nn.Linear(prev, n_tasks) if n_tasks > 0 else None

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            h = self.trunk(x)
            return self.out(h), (self.aux(h) if self.aux is not None else None)

    return _Mlp()


class MlpQualityPredictor(QualityPredictor):
    """Shared-trunk MLP, one sigmoid output per model (see module docstring).

    ``n_members`` networks (seeds ``seed, seed + 1, ...``, each with its own validation split) are
    averaged: on routing data this cuts the variance of a quickly-overfitting head. Inputs are
    standardised with the training mean/std (stored). ``task_ids`` must lie in ``[0, n_tasks)``;
    the auxiliary head is skipped when ``task_ids`` is None or ``aux_task_weight`` is 0.
    """

    name = "mlp"

    def __init__(
        self,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        epochs: int = 60,
        batch_size: int = 128,
        aux_task_weight: float = 0.0,
        n_tasks: int = 6,
        val_fraction: float = 0.1,
        patience: int = 10,
        seed: int = 0,
        n_members: int = 5,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.aux_task_weight = aux_task_weight
        self.n_tasks = n_tasks
        self.val_fraction = val_fraction
        self.patience = patience
        self.seed = seed
        self.n_members = n_members

    def fit(self, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None = None) -> MlpQualityPredictor:
        """Train on ``X (n, d)``, ``Y (n, m)`` (NaN = no outcome), optional ``task_ids (n,)``."""
        import torch

        X, Y, task_ids = self._check_fit_inputs(X, Y, task_ids)
        task_ids = self._aux_task_ids(task_ids)
        if int(self.n_members) < 1:
            raise ValueError(f"MlpQualityPredictor: n_members must be >= 1, got {self.n_members}")
        mean, scale = X.mean(axis=0), X.std(axis=0) + 1e-6
        Xs = ((X - mean) / scale).astype(np.float32)
        modules, histories = [], []
        for member in range(int(self.n_members)):
            seed = int(self.seed) + member
            torch.manual_seed(seed)
            module = _build_mlp(
                X.shape[1], list(self.hidden), Y.shape[1], int(self.n_tasks), float(self.dropout)
            )
            init_output_bias(module.out, Y)
            histories.append(
                train_masked_bce(
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
                    seed=seed,
                )
            )
            modules.append(module)
        layers = [[m for m in mod.trunk if isinstance(m, torch.nn.Linear)] + [mod.out] for mod in modules]
        weights = [np.stack([ls[i].weight.detach().numpy() for ls in layers]) for i in range(len(layers[0]))]
        biases = [np.stack([ls[i].bias.detach().numpy() for ls in layers]) for i in range(len(layers[0]))]
        self._set_state(mean, scale, weights, biases)
        self.history_ = histories[0] if len(histories) == 1 else {"members": histories}
        self.module_ = modules
        return self

    def _set_state(self, mean: Any, scale: Any, weights: list[np.ndarray], biases: list[np.ndarray]) -> None:
        self.x_mean_ = np.ascontiguousarray(mean, dtype=np.float32)
        self.x_scale_ = np.ascontiguousarray(scale, dtype=np.float32)
        self.weights_ = [np.ascontiguousarray(w, dtype=np.float32) for w in weights]  # (E, out, in)
        self.biases_ = [np.ascontiguousarray(b, dtype=np.float32) for b in biases]  # (E, out)
        # the first layer reads the same input in every member: one (d, E * out) matrix, one BLAS
        # product (a stacked matmul broadcasting the input runs ~1.7x slower on one row)
        w0 = self.weights_[0]
        self._w0_cat = np.ascontiguousarray(w0.transpose(2, 0, 1).reshape(w0.shape[2], -1))
        self._weights_t = [np.ascontiguousarray(w.transpose(0, 2, 1)) for w in self.weights_[1:]]
        self._biases_b = [b[:, None, :] for b in self.biases_]
        self.dim_ = int(self.x_mean_.shape[0])
        self.n_models_ = int(self.weights_[-1].shape[1])

    def predict_members(self, X: np.ndarray) -> np.ndarray:
        """Each member's probabilities, ``(n, d) -> (E, n, m)`` float64 (numpy forward pass)."""
        return self._members(self._check_X(X))

    def _members(self, X: np.ndarray) -> np.ndarray:
        n, (E, out0) = X.shape[0], self.biases_[0].shape
        h = ((X - self.x_mean_) / self.x_scale_) @ self._w0_cat  # (n, E * out)
        h = h.reshape(n, E, out0).transpose(1, 0, 2) + self._biases_b[0]  # (E, n, out)
        for wt, b in zip(self._weights_t, self._biases_b[1:], strict=True):
            h = np.matmul(np.maximum(h, 0.0), wt) + b  # (E, n, out)
        return sigmoid(h)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Expected score per model (mean over members), ``(n, d) -> (n, m)`` float64 in [0, 1]."""
        return self.predict_members(X).mean(axis=0)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("weights_")
        state = {"x_mean": self.x_mean_, "x_scale": self.x_scale_}
        for i, (w, b) in enumerate(zip(self.weights_, self.biases_, strict=True)):
            state[f"layer{i}.weight"] = w
            state[f"layer{i}.bias"] = b
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> MlpQualityPredictor:
        n = len(self.hidden) + 1
        d, m = state_size(state, "x_mean", 0), state_size(state, f"layer{n - 1}.bias", -1)
        sizes = [d, *(int(h) for h in self.hidden), m]
        E = int(self.n_members)
        shapes: dict[str, tuple[int | None, ...]] = {"x_mean": (d,), "x_scale": (d,)}
        for i in range(n):
            shapes[f"layer{i}.weight"] = (E, sizes[i + 1], sizes[i])
            shapes[f"layer{i}.bias"] = (E, sizes[i + 1])
        s = check_state(state, shapes, "MlpQualityPredictor")
        self._set_state(
            s["x_mean"],
            s["x_scale"],
            [s[f"layer{i}.weight"] for i in range(n)],
            [s[f"layer{i}.bias"] for i in range(n)],
        )
        return self
