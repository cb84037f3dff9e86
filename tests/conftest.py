"""Shared test set-up: offline hub, the real data directory, small helpers."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from router_ml.paths import data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real routing data (ROUTER_ML_DATA_DIR, default ../shared/data); skip when absent."""
    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"real routing data not found at {str(path)!r}; set ROUTER_ML_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    """One embedding cache for the whole test session (subprocesses get it via the env var)."""
    path = Path(os.environ.get("ROUTER_ML_CACHE_DIR") or tmp_path_factory.mktemp("emb-cache"))
    os.environ["ROUTER_ML_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, embedding_cache) -> Path:
    """A small real router trained in-process on the project's prompts (simulated outcomes)."""
    from router_ml.training import train

    run = tmp_path_factory.mktemp("run")
    from experiments.bench_servers import SMALL_ROUTER  # the small router the proxy benchmarks serve

    cfg = {**copy.deepcopy(SMALL_ROUTER), "name": "test-simulated-knn"}
    train(cfg, run_dir=run)
    return run
