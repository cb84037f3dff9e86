"""The numbered notebooks run headless, top to bottom, in a kernel of the interpreter running the tests.

Notebooks 02 and 03 read an evaluation run folder this module writes once (simulated outcomes, one
seed, 1000 paced requests) through ``ROUTER_ML_RUN_DIR``, so no test depends on ``outputs/``;
notebook 03 loads the session's trained router through ``ROUTER_ML_CHECKPOINT``. Notebook 01 reads
the real data sets and is skipped without them. The notebooks are executed in memory: the files in
the repository stay without outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from router_ml.paths import data_dir

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01-data-overview.ipynb", "02-quality-cost-frontiers.ipynb", "03-tasks-and-calibration.ipynb")
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A ``python3`` kernelspec that starts this interpreter (not whatever ``python`` is on PATH)."""
    spec = tmp_path_factory.mktemp("kernels") / "python3"
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3 (router-ml tests)", "language": "python"})
    )
    return spec.parent


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, embedding_cache) -> Path:
    """A small evaluation run folder: simulated data, seed 0, pacing over 1000 requests."""
    from hydra import compose, initialize_config_dir

    from router_ml.evaluation.harness import evaluate

    overrides = ["data=simulated", "seeds=[0]", "pacing.requests=1000"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    run = tmp_path_factory.mktemp("evaluate")
    evaluate(cfg, run_dir=run)
    return run


@pytest.fixture
def notebook_env(monkeypatch, eval_run, embedding_cache) -> pytest.MonkeyPatch:
    """The kernel inherits this environment: the run folder, the embedding cache, absolute data dir."""
    monkeypatch.setenv("ROUTER_ML_RUN_DIR", str(eval_run))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ROUTER_ML_CHECKPOINT", raising=False)
    if data_dir().is_dir():  # the notebooks work from the repository root; keep a relative default valid
        monkeypatch.setenv("ROUTER_ML_DATA_DIR", str(data_dir().resolve()))
    return monkeypatch


def execute(name: str, kernel_dir: Path):
    """Run one notebook in memory; a failing cell raises ``CellExecutionError`` naming the cell."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    client = nbclient.NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def texts(nb) -> str:
    """Everything the notebook printed or returned as text, joined."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o["text"])
            elif "text/plain" in o.get("data", {}):
                out.append(o["data"]["text/plain"])
    return "\n".join(out)


def n_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs_and_sets_offline_first(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear the outputs"
    assert 'os.environ["HF_HUB_OFFLINE"] = "1"' in code[0].source
    assert "pyproject.toml" in code[0].source  # finds the repository root, no absolute paths
    assert any(c.cell_type == "markdown" for c in nb.cells[1:])
    assert any("router_ml" in c.source for c in code)


def test_01_data_overview_runs_on_the_real_data(shared_data, notebook_env, kernel_dir):
    nb = execute(NAMES[0], kernel_dir)
    out = texts(nb)
    for source in ("llmrouter", "routerbench", "mmlu_pro", "alpaca_eval"):
        assert source in out
    assert "models priced" in out and "tokens_per_s" in out
    assert n_images(nb) >= 6


def test_02_frontiers_read_the_given_run_folder(notebook_env, eval_run, kernel_dir):
    nb = execute(NAMES[1], kernel_dir)
    out = texts(nb)
    assert f"run folder: {eval_run} (from $ROUTER_ML_RUN_DIR)" in out
    for shown in ("utility[knn]", "oracle", "zero", "apgr", "spend_vs_target", "never_over_cap"):
        assert shown in out, shown
    assert n_images(nb) >= 5


def test_03_tasks_calibration_and_confusion_matrix(notebook_env, eval_run, trained_run, kernel_dir):
    checkpoint = trained_run / "checkpoint"
    notebook_env.setenv("ROUTER_ML_CHECKPOINT", str(checkpoint))
    nb = execute(NAMES[2], kernel_dir)
    out = texts(nb)
    assert f"run folder: {eval_run} (from $ROUTER_ML_RUN_DIR)" in out
    assert f"checkpoint: {checkpoint} (from $ROUTER_ML_CHECKPOINT)" in out
    assert "ECE from the binned curve" in out
    # the held-out prompts were rebuilt exactly: the same macro-F1 as training recorded
    assert "macro-F1 matches the checkpoint's record: True" in out
    assert n_images(nb) >= 3
