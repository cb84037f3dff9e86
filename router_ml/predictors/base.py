"""The predictor contract shared by every head (scikit-learn style, persisted without pickle).

- ``__init__`` only stores its keyword arguments (all JSON-serialisable): they are the params.
- ``fit(X, Y, ...)`` learns, sets attributes ending in ``_`` and returns ``self``.
- ``get_params()`` returns the constructor arguments (what goes into ``router.json``).
- ``state_dict()`` returns the learned state as ``{name: np.ndarray}`` (what goes into
  safetensors); ``load_state_dict(state)`` restores it onto an unfitted instance built from
  the same params. Round trip: ``type(p)(**p.get_params()).load_state_dict(p.state_dict())``
  predicts exactly what ``p`` predicts.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np


class TaskHead(Protocol):
    """What a router needs of its task head (:class:`~router_ml.predictors.task.TaskClassifier`)."""

    labels: Sequence[str]
    layers: list[int]
    dim_: int

    def text_part(self, texts: Sequence[str]) -> np.ndarray | None:
        """``(n, L)`` what the texts add to the logits (None: the head reads no text)."""
        ...

    def predict_proba(
        self, X: np.ndarray, texts: Sequence[str] | None = None, text_part: np.ndarray | None = None
    ) -> np.ndarray:
        """``(n, d) -> (n, L)`` task probabilities."""
        ...

    def predict(self, X: np.ndarray, texts: Sequence[str] | None = None) -> list[str]: ...
    def get_params(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, np.ndarray]: ...


class QualityHead(Protocol):
    """What a router needs of its quality head (every :class:`QualityPredictor`): ``predict(X)``,
    and, when ``uses_text``, ``predict(X, texts=..., text_part=...)``; ``X`` holds the states of
    its ``layers`` after the embedding."""

    uses_text: bool
    layers: Sequence[int]
    n_models_: int
    dim_: int

    def text_part(self, texts: Sequence[str]) -> Any: ...
    def predict(self, X: np.ndarray) -> np.ndarray: ...
    def get_params(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, np.ndarray]: ...


class Calibrator(Protocol):
    """A fitted map of predicted quality ``(n, m) -> (n, m)`` (isotonic, temperature)."""

    def transform(self, pred: np.ndarray) -> np.ndarray: ...
    def get_params(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, np.ndarray]: ...


class NotFittedError(RuntimeError):
    """A predictor was used before ``fit`` or ``load_state_dict``."""


class BasePredictor:
    """Base class: params from the constructor signature, array state for persistence."""

    #: registry key (the conf YAML stem), set by subclasses
    name: ClassVar[str] = ""

    def get_params(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {
            k: getattr(self, k)
            for k, p in sig.parameters.items()
            if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def set_params(self, **params: Any) -> BasePredictor:
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"{type(self).__name__}: unknown parameter {k!r}; valid: {sorted(valid)}")
            setattr(self, k, v)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, np.ndarray]) -> BasePredictor:
        raise NotImplementedError

    def _check_fitted(self, attr: str) -> None:
        if not hasattr(self, attr):
            raise NotFittedError(
                f"{type(self).__name__} is not fitted: call fit() or load_state_dict() first"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def require_state(state: dict[str, np.ndarray], keys: list[str], owner: str) -> None:
    """Raise a clear error if a loaded state lacks arrays (corrupted or mismatched checkpoint)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{owner}: checkpoint state is missing array(s) {missing}")


def check_state(
    state: dict[str, np.ndarray], shapes: dict[str, tuple[int | None, ...]], owner: str
) -> dict[str, np.ndarray]:
    """Check a loaded state's keys and shapes; ``None`` in a shape matches any size.

    Returns the arrays (as numpy arrays) for the expected keys; raises ``ValueError`` naming the
    missing, unexpected or wrongly shaped array.
    """
    require_state(state, list(shapes), owner)
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise ValueError(f"{owner}: checkpoint state has unexpected array(s) {extra}")
    out = {}
    for key, shape in shapes.items():
        arr = np.asarray(state[key])
        ok = arr.ndim == len(shape) and all(
            s is None or s == a for s, a in zip(shape, arr.shape, strict=True)
        )
        if not ok:
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{owner}: array {key!r} has shape {arr.shape}, expected {want}")
        out[key] = arr
    return out


def state_size(state: dict[str, np.ndarray], key: str, axis: int) -> int | None:
    """Size of ``state[key]`` along ``axis`` (None when absent or of too low rank; checked later)."""
    if key not in state:
        return None
    shape = np.shape(state[key])
    return int(shape[axis]) if -len(shape) <= axis < len(shape) else None


# lazily found BLAS thread-count controllers (no work at import time), with the number of modules
# imported when they were found: a later import may load another BLAS (scipy's own OpenBLAS)
_BLAS: list[Any] = []


class _OneThreadBlas:
    """BLAS on one thread inside the block, the previous thread counts restored after.

    What ``threadpoolctl``'s ``limit(limits=1, user_api="blas")`` does, through the controllers it
    found once: entering ``limit`` re-reads every library's info (~10 us, ~60 us right after an
    encoder call has evicted the caches), a get/set of the thread count costs ~1 us.
    """

    __slots__ = ("_libs", "_saved")

    def __init__(self, libs: list[Any]) -> None:
        self._libs, self._saved = libs, []

    def __enter__(self) -> _OneThreadBlas:
        for lib in self._libs:
            n = lib.get_num_threads()
            if n is not None and n > 1:
                lib.set_num_threads(1)
                self._saved.append((lib, n))
        return self

    def __exit__(self, *exc: object) -> None:
        for lib, n in self._saved:
            lib.set_num_threads(n)
        self._saved = []


def _blas_libs() -> list[Any]:
    if not _BLAS or _BLAS[1] != len(sys.modules):
        try:
            from threadpoolctl import ThreadpoolController

            libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except ImportError:  # threadpoolctl ships with scikit-learn; degrade gracefully without it
            libs = []
        _BLAS[:] = [libs, len(sys.modules)]
    return _BLAS[0]


_ONE_THREAD_FOR_GOOD: list[bool] = []  # set by one_blas_thread_for_good(): nothing to switch


def one_blas_thread_for_good() -> None:
    """Run BLAS on one thread from now on, for the whole process (a server whose products are all
    few-row ones: :func:`few_rows_blas` then has nothing to switch and costs nothing)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    _ONE_THREAD_FOR_GOOD[:] = [True]


def few_rows_blas(n_rows: int, limit: int = 64) -> contextlib.AbstractContextManager:
    """Single-threaded BLAS for small batches (``n_rows <= limit``), a no-op otherwise.

    Waking BLAS worker threads costs more than a one-row product saves, and on a loaded machine
    a threaded one-row ``(1, d) @ (d, N)`` product takes milliseconds instead of ~0.1 ms.
    """
    if n_rows > limit or _ONE_THREAD_FOR_GOOD:
        return contextlib.nullcontext()
    libs = _blas_libs()
    return _OneThreadBlas(libs) if libs else contextlib.nullcontext()


def param_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of a {param: [values]} grid (a list value of lists stays a value)."""
    keys = sorted(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def as_float_matrix(X: Any, owner: str, dim: int | None = None, dtype: Any = np.float32) -> np.ndarray:
    """``X`` as a C-contiguous ``(n, d)`` array; clear errors for wrong rank or width."""
    X = np.asarray(X, dtype=dtype)
    if X.ndim != 2:
        raise ValueError(
            f"{owner}: expected a 2-D array (n, d), got shape {X.shape}; use X[None, :] for one row"
        )
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"{owner}: expected {dim} features per row (fitted dimension), got {X.shape[1]}")
    return np.ascontiguousarray(X)


class QualityPredictor(BasePredictor):
    """Per-model quality head: ``fit(X (n, d), Y (n, m) in [0, 1], NaN = no outcome, task_ids (n,))``
    then ``predict(X (n, d)) -> (n, m)`` float64 in [0, 1], one path for one row and for a batch.
    Sets ``n_models_`` and ``dim_``."""

    def fit(self, X: np.ndarray, Y: np.ndarray, task_ids: np.ndarray | None = None) -> QualityPredictor:
        raise NotImplementedError

    def predict(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    #: True for a head whose ``fit`` and ``predict`` also take the prompt ``texts`` (and a
    #: precomputed ``text_part``); the others read only the embedding
    uses_text: bool = False

    #: encoder layers whose mean-pooled states the head reads beside the embedding: its ``X`` is
    #: then the encoder's ``encode_layers(texts, layers)``, ``(n, dim * (1 + len(layers)))``, which
    #: the router takes from the same forward pass as the embedding; ``()``: the embedding alone
    layers: Sequence[int] = ()

    def text_part(self, texts: Sequence[str]) -> Any:
        """What the texts contribute, computable before the encoder runs (None: nothing)."""
        return None

    def _check_fit_inputs(
        self, X: Any, Y: Any, task_ids: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        owner = type(self).__name__
        X = as_float_matrix(X, owner)
        Y = np.asarray(Y, dtype=np.float64)
        if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
            raise ValueError(f"{owner}: Y must have shape (n, m) with n = {X.shape[0]} rows, got {Y.shape}")
        if not np.isfinite(X).all():
            raise ValueError(f"{owner}: X contains NaN or infinite values")
        finite = Y[~np.isnan(Y)]
        if finite.size and (finite.min() < 0.0 or finite.max() > 1.0 or not np.isfinite(finite).all()):
            raise ValueError(f"{owner}: scores in Y must lie in [0, 1] (NaN = no outcome)")
        empty = np.where(np.isnan(Y).all(axis=0))[0]
        if empty.size:
            raise ValueError(f"{owner}: model column(s) {empty.tolist()} have no observed score")
        if task_ids is not None:
            task_ids = np.asarray(task_ids)
            if task_ids.shape != (X.shape[0],) or not np.issubdtype(task_ids.dtype, np.integer):
                raise ValueError(f"{owner}: task_ids must be an integer array of shape ({X.shape[0]},)")
            task_ids = task_ids.astype(np.int64)
        return X, Y, task_ids

    def _aux_task_ids(self, task_ids: np.ndarray | None) -> np.ndarray | None:
        """The task ids an auxiliary task head trains on (None when ``aux_task_weight`` <= 0)."""
        if float(getattr(self, "aux_task_weight", 0.0)) <= 0 or task_ids is None:
            return None  # only the auxiliary head reads them
        n_tasks = int(self.n_tasks)
        if task_ids.min() < 0 or task_ids.max() >= n_tasks:
            raise ValueError(f"{type(self).__name__}: task_ids must lie in [0, n_tasks={n_tasks})")
        return task_ids

    def _check_X(self, X: Any) -> np.ndarray:
        self._check_fitted("dim_")
        return as_float_matrix(X, type(self).__name__, self.dim_)
