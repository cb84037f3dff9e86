"""Shared test set-up: two tiers, an offline hub, the real data directory, small helpers.

Tiers. Plain ``pytest`` runs the fast tier, the edit-test loop: unit tests, a couple of minutes on
two cores. ``pytest --full`` runs every test, the full tier as well: what trains or evaluates a
router, runs an experiment or the main job in a subprocess, executes a notebook, or starts a real
server. A test is in the full tier when it uses the ``embedding_cache`` fixture (everything that
trains, evaluates or embeds a data set does, ``trained_run`` included) or is marked ``full``,
``slow`` or ``integration``; :func:`pytest_collection_modifyitems` adds the ``full`` mark to it, so
``-m full`` / ``-m "not full"`` select by tier. A ``-m`` expression or a test named by its id
(``path::test``) overrides the tier.

The hub is offline for every test (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``): nothing is
downloaded, and a data set that is missing fails at once instead of being fetched.
"""

from __future__ import annotations

import copy
import os

# Set before anything imports huggingface_hub or datasets, which read them once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from router_ml.paths import data_dir

# Session fixtures that put a test in the full tier: the embedding cache is what every test that
# trains, evaluates, runs an experiment or a notebook, or embeds a real data set asks for.
FULL_TIER_FIXTURES = frozenset({"embedding_cache", "trained_run"})
FULL_TIER_MARKS = ("full", "slow", "integration")
_FULL_DESELECTED = pytest.StashKey[int]()  # how many the fast tier left out, for the summary


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="run the full tier too (training, experiments, notebooks, real servers, slow tests); CI runs this",
    )


def _named(config: pytest.Config) -> list[str]:
    """Test ids named on the command line (``path::test``), as node ids (relative to the rootdir)."""
    ids = []
    for arg in config.args:
        path, sep, rest = arg.partition("::")
        if not sep:
            continue
        path = Path(os.path.relpath(Path(path).resolve(), config.rootpath)).as_posix()
        ids.append(f"{path}::{rest}")
    return ids


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects, so that ``-m full`` sees the added marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if FULL_TIER_FIXTURES.intersection(item.fixturenames) or any(
            item.get_closest_marker(m) for m in FULL_TIER_MARKS
        ):
            item.add_marker(pytest.mark.full)
    if config.getoption("--full") or config.option.markexpr:
        return
    named = _named(config)
    keep, drop = [], []
    for item in items:
        chosen = any(item.nodeid == n or item.nodeid.startswith((f"{n}[", f"{n}::")) for n in named)
        (drop if item.get_closest_marker("full") and not chosen else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
        config.stash[_FULL_DESELECTED] = len(drop)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    n = config.stash.get(_FULL_DESELECTED, 0)
    if n:
        terminalreporter.write_line(
            f"fast tier: {n} full-tier tests deselected (training, experiments, notebooks, "
            "real servers); `pytest --full` runs them"
        )


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
