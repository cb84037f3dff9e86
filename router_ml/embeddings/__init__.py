"""Encoders: prompt texts -> ``(n, dim)`` float32 unit-norm embeddings, with an on-disk cache.

    from router_ml.embeddings import build_encoder, CachedEncoder, encode_cached
    enc = build_encoder("minilm")                 # packaged all-MiniLM-L6-v2, loads on first encode
    X = CachedEncoder(enc).encode(prompts)        # (n, 384); only uncached prompts are encoded
    enc2 = build_encoder(enc.get_config())        # what a checkpoint records and rebuilds

Nothing heavy is imported here: torch / sentence-transformers / model2vec load on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from router_ml.embeddings.base import Encoder, check_texts, l2_normalize
from router_ml.embeddings.cache import CachedEncoder
from router_ml.embeddings.sentence import SentenceTransformerEncoder
from router_ml.embeddings.static import StaticEncoder

__all__ = [
    "ENCODERS",
    "PRESETS",
    "CachedEncoder",
    "Encoder",
    "SentenceTransformerEncoder",
    "StaticEncoder",
    "build_encoder",
    "check_texts",
    "encode_cached",
    "l2_normalize",
]

#: ``{"type": ...}`` values (the conf ``encoder/`` group's ``type`` key) -> encoder class.
ENCODERS: dict[str, type] = {
    "sentence_transformer": SentenceTransformerEncoder,
    "static": StaticEncoder,
}
#: Short names accepted by ``build_encoder`` -> full config.
PRESETS: dict[str, dict[str, Any]] = {
    "minilm": {"type": "sentence_transformer", "model": "minilm"},
    "static": {"type": "static", "model": "tokenlearn-static"},
}


def build_encoder(cfg: dict[str, Any] | str) -> Encoder:
    """An encoder from a preset name ("minilm", "static") or a config ``{"type": ..., **kwargs}``.

    ``build_encoder(enc.get_config())`` rebuilds an encoder equivalent to ``enc`` (same ``id``).
    """
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown encoder {cfg!r}; known presets: {sorted(PRESETS)}")
        cfg = PRESETS[cfg]
    if not isinstance(cfg, dict) and hasattr(cfg, "items"):  # e.g. an OmegaConf DictConfig
        cfg = dict(cfg.items())
    if not isinstance(cfg, dict):
        raise TypeError(f"encoder config must be a preset name or a dict, got {type(cfg).__name__}")
    kwargs = dict(cfg)
    kind = kwargs.pop("type", None)
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder type {kind!r} in {cfg!r}; known types: {sorted(ENCODERS)}")
    cls = ENCODERS[kind]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for encoder type {kind!r}: {err}") from err


@lru_cache(maxsize=4)
def _memo_encoder(cfg_json: str) -> Encoder:
    return build_encoder(json.loads(cfg_json))


def encode_cached(
    encoder_cfg: dict[str, Any] | str,
    texts: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    show_progress: bool | None = None,
) -> np.ndarray:
    """Encode ``texts`` (n,) -> ``(n, dim)`` through the on-disk cache.

    The encoder built from ``encoder_cfg`` is kept (a few per process), so repeated calls do
    not reload the model.
    """
    if not isinstance(encoder_cfg, (str, dict)) and hasattr(encoder_cfg, "items"):
        encoder_cfg = dict(encoder_cfg.items())  # e.g. an OmegaConf DictConfig
    encoder = _memo_encoder(json.dumps(encoder_cfg, sort_keys=True))
    cached = CachedEncoder(encoder, cache_dir=cache_dir)
    try:
        return cached.encode(texts, batch_size, show_progress)
    finally:
        cached.close()
