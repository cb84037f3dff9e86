"""The encoder contract: texts in, ``(n, dim)`` float32 L2-normalised rows out.

Every encoder has a stable ``id`` (the embedding-cache key and what checkpoints record: never a
machine path), a ``dim`` known without encoding anything, ``encode(texts)`` and a JSON-able
``get_config()`` from which ``router_ml.embeddings.build_encoder`` rebuilds an equivalent encoder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: ``show_progress=None`` turns a progress bar on when more than this many texts need encoding.
PROGRESS_THRESHOLD = 256


@runtime_checkable
class Encoder(Protocol):
    """What the rest of router-ml needs from a text encoder."""

    id: str
    dim: int

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool | None = None
    ) -> np.ndarray:
        """``(n, dim)`` float32 with unit-norm rows; ValueError naming the index of a bad text."""
        ...

    def get_config(self) -> dict[str, Any]:
        """JSON-able config; ``build_encoder(get_config())`` rebuilds an equivalent encoder."""
        ...


def check_texts(texts: Sequence[str]) -> list[str]:
    """Validate a batch of prompts: a list of non-empty ``str``; errors name the first bad index."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not a single string; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(f"text at index {i} is {type(t).__name__}, expected a non-empty str")
        if not t.strip():
            raise ValueError(f"text at index {i} is empty (or whitespace only); cannot embed an empty prompt")
    return out


def check_layers(layers: Sequence[int]) -> tuple[int, ...]:
    """Encoder layer numbers as a sorted tuple of distinct ints >= 0 (0 = the token embeddings)."""
    try:
        out = tuple(int(k) for k in layers)
    except (TypeError, ValueError):
        raise ValueError(f"layers must be a list of layer numbers, got {layers!r}") from None
    if any(k < 0 for k in out) or list(out) != sorted(set(out)) or any(isinstance(k, bool) for k in layers):
        raise ValueError(
            f"layers must be distinct layer numbers >= 0 in increasing order, got {list(layers)}"
        )
    return out


def layer_columns(have: Sequence[int], want: Sequence[int], dim: int) -> np.ndarray:
    """Column indices, in an ``encode_layers(texts, have)`` matrix ``(n, dim * (1 + len(have)))``,
    of the embedding followed by the states of ``want`` (each one of ``have``): how one forward pass
    over the union of two heads' layers gives each head its own features."""
    have, want = check_layers(have), check_layers(want)
    missing = sorted(set(want) - set(have))
    if missing:
        raise ValueError(f"layers {missing} are not among the encoded layers {list(have)}")
    blocks = [0, *(1 + have.index(k) for k in want)]
    return np.concatenate([np.arange(b * dim, (b + 1) * dim) for b in blocks])


class LayeredEncoder:
    """An encoder's vectors followed by the mean-pooled, unit-norm hidden states after ``layers``
    (one forward pass; ``inner.encode_layers``): ``dim = inner.dim * (1 + len(layers))``. Its own
    ``id`` names the layers, so an embedding cache keeps these vectors apart from the plain ones."""

    def __init__(self, inner: Any, layers: Sequence[int]) -> None:
        if not hasattr(inner, "encode_layers"):
            raise ValueError(f"encoder {getattr(inner, 'id', inner)!r} cannot give its layer states")
        self.inner, self.layers = inner, check_layers(layers)
        self.id = f"{inner.id}+layers:{','.join(map(str, self.layers))}"

    @property
    def dim(self) -> int:
        return int(self.inner.dim) * (1 + len(self.layers))

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool | None = None
    ) -> np.ndarray:
        return self.inner.encode_layers(
            texts, self.layers, batch_size=batch_size, show_progress=show_progress
        )

    def get_config(self) -> dict[str, Any]:
        return {**self.inner.get_config(), "layers": list(self.layers)}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of ``(n, d)`` -> ``(n, d)`` float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def want_progress(show_progress: bool | None, n_todo: int) -> bool:
    """Resolve ``show_progress=None`` (auto) against how many texts are left to encode."""
    return n_todo > PROGRESS_THRESHOLD if show_progress is None else bool(show_progress)


def empty_embeddings(dim: int) -> np.ndarray:
    """A ``(0, dim)`` float32 array: what encoding an empty list returns."""
    return np.zeros((0, dim), dtype=np.float32)


def folder_fingerprint(folder: Path, patterns: Iterable[str] = ("*.json", "*.safetensors", "*.bin")) -> str:
    """8-hex-digit hash of the names and sizes of a model folder's config/weights files.

    Gives a local model a stable id without putting a machine path into it.
    """
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in folder.rglob(pat) if p.is_file()})
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:8]


def is_local_path(model: str) -> bool:
    """True when ``model`` names an existing folder on this machine (rather than a hub id)."""
    return os.path.isdir(os.path.expanduser(model))


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network access to the Hugging Face hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_snapshot(model: str, kind: str) -> Path | None:
    """Local snapshot folder of a hub model; with the hub offline a missing one fails fast.

    Returns ``None`` when the hub is online and the model is not cached yet (the loader will
    download it). ``kind`` names the library in the error ("sentence-transformers", "model2vec").
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError) as err:
        if hub_offline():
            raise FileNotFoundError(
                f"{kind} model {model!r} is neither a local folder nor in the Hugging Face cache, and "
                f"HF_HUB_OFFLINE=1 forbids downloading it; use a packaged model or a local path"
            ) from err
        return None
