"""Shared test set-up: offline hub, the real data directory, small helpers."""

from __future__ import annotations

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
    cfg = {
        "name": "test-simulated-knn",
        "seed": 0,
        "data": {"name": "simulated", "adapter": "simulated", "sources": ["project"], "options": {"seed": 0}},
        "encoder": {"type": "sentence_transformer", "model": "minilm"},
        "predictor": {"name": "knn", "params": {"k": 10}},
        "calibrator": {"name": "isotonic"},
        "task_head": {"params": {"class_weight": "balanced", "text_features": 4096, "view_words": 16}},
        "split": {"test_size": 0.2, "val_size": 0.1},
        "task_data": {},
    }
    train(cfg, run_dir=run)
    return run
