"""Where router-ml reads external data and keeps its caches.

Both are configuration, never hard-coded: ``ROUTER_ML_DATA_DIR`` points at the routing data sets
(default ``../shared/data`` relative to the working directory) and ``ROUTER_ML_CACHE_DIR`` at the
embedding cache and fetched data sets (default ``~/.cache/router_ml``).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "ROUTER_ML_DATA_DIR"
CACHE_DIR_ENV = "ROUTER_ML_CACHE_DIR"
#: the routing data set shipped inside the package (:mod:`router_ml.data.default`)
SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "data" / "default"
#: its table: llmrouter_ulab's prompts and scores, with the scored models' prices in its metadata
SHIPPED_LLMROUTER_FILE = SHIPPED_DATA_DIR / "llmrouter_ulab.parquet"
#: every routing policy's parameters, ``<name>.yaml`` (:mod:`router_ml.conf`): what the proxy serves
#: and the Hydra experiments' ``policy`` group
POLICY_CONFIG_DIR = Path(__file__).resolve().parent / "conf" / "policy"


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Root of the external routing data sets (one sub-folder per source)."""
    raw = override or os.environ.get(DATA_DIR_ENV) or "../shared/data"
    return Path(raw).expanduser()


def source_dir(name: str, override: str | os.PathLike | None = None) -> Path:
    """Folder of one data set in the data dir; a clear error when it is missing (a public source
    missing there is fetched by :func:`router_ml.data.fetch.locate`, which the adapters use)."""
    path = data_dir(override) / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"data set folder {str(path)!r} not found; set {DATA_DIR_ENV} to the folder that holds "
            f"{name!r} (currently {str(data_dir(override))!r})"
        )
    return path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    raw = override or os.environ.get(CACHE_DIR_ENV) or "~/.cache/router_ml"
    path = Path(raw).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def project_data_dir() -> Path:
    """The repository's own ``data/`` folder (files the project wrote itself)."""
    return Path(__file__).resolve().parent.parent / "data"
