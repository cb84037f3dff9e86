"""Hydra experiments: every config composes; train/export run end to end as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from router_ml import LearnedRouter

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def _compose(overrides: list[str], name: str = "train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("data", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_every_data_config_composes(data):
    cfg = _compose([f"data={data}"])
    assert cfg.data.name == data and cfg.data.adapter


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_file_composes(experiment):
    cfg = _compose([f"+experiment={experiment}"])
    assert cfg.predictor.name in ("knn", "linear", "mlp", "mf", "taskmix")


@pytest.mark.parametrize("group", ["predictor", "encoder", "calibrator"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        assert _compose([f"{group}={option}"])[group] is not None


def test_the_policy_group_comes_from_the_package():
    """conf/ has no copy of the policies: evaluate's ``policy`` group is the package's
    (router_ml/conf/policy/, reached through hydra.searchpath), every option of it."""
    from router_ml.paths import POLICY_CONFIG_DIR

    assert not (CONF / "policy").exists()
    for option in sorted(p.stem for p in POLICY_CONFIG_DIR.glob("*.yaml")):
        cfg = _compose([f"policy@policies.utility={option}"], name="evaluate")
        assert cfg.policies.utility.name == option


def _run(
    args: list[str], cwd: Path, timeout: int = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_on_shrunk_llmrouter_writes_loadable_checkpoint(tmp_path, shared_data, embedding_cache):
    run = tmp_path / "run"
    _run(
        [
            "-m",
            "experiments.train",
            "data=llmrouter",
            "data.max_prompts=400",
            "predictor=linear",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["test/quality"] <= 1 and metrics["test/n_prompts"] >= 60
    assert (run / ".hydra" / "config.yaml").is_file()
    router = LearnedRouter.from_pretrained(run / "checkpoint")
    assert len(router.models) == 9
    assert (
        router.route("def add(a, b): return a + b  # add type hints and a docstring").model in router.models
    )


def test_multirun_sweep_over_predictors(tmp_path, shared_data, embedding_cache):
    sweep = tmp_path / "sweep"
    _run(
        [
            "-m",
            "experiments.train",
            "-m",
            "data=llmrouter",
            "data.max_prompts=200",
            "predictor=knn,mf",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
    )
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    for r in runs:
        assert json.loads((r / "metrics.json").read_text())["test/quality"] > 0
        LearnedRouter.from_pretrained(r / "checkpoint")


def test_default_data_is_llmrouter_shipped_in_the_package(tmp_path, monkeypatch):
    """With no data folder, the main job's default data config loads the copy in the package."""
    from router_ml.data.loading import load_routing_data

    cfg = _compose([])
    assert cfg.data.name == "llmrouter" and cfg.name == "llmrouter-taskmix"
    monkeypatch.setenv("ROUTER_ML_DATA_DIR", str(tmp_path / "nonexistent"))
    table = load_routing_data(cfg.data)
    assert table["prompt_id"].nunique() == 5478 and table["model"].nunique() == 9
    assert table["cost_usd"].notna().all()


def test_main_job_default_then_export(tmp_path, embedding_cache):
    """The main job as on a fresh machine: no data folder, run from outside the repository."""
    run = tmp_path / "main"
    no_data = {"ROUTER_ML_DATA_DIR": str(tmp_path / "nonexistent")}
    proc = _run(
        ["-m", "experiments.train", "data.max_prompts=300", f"hydra.run.dir={run}"], cwd=tmp_path, env=no_data
    )
    assert "reading the copy shipped in the package" in proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/task_macro_f1"] > 0.5 and 0 < metrics["test/quality"] <= 1
    router = LearnedRouter.from_pretrained(run / "checkpoint")
    assert len(router.models) == 9 and router.metadata["training"]["data"] == "llmrouter"
    dest = tmp_path / "exported"
    _run(["-m", "experiments.export", f"run={run}", f"to={dest}"], cwd=ROOT)
    assert LearnedRouter.from_pretrained(dest).models


def test_export_of_missing_run_fails_clearly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"run={tmp_path / 'nope'}", f"to={tmp_path / 'x'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr


def test_exported_router_is_refitted_on_every_labelled_prompt(tmp_path, trained_run):
    """refit.enabled: the split's held-out figures are kept; the checkpoint holds a router with the
    same hyper-parameters fitted on all prompts, calibrated on out-of-fold predictions."""
    import copy

    from experiments.bench_servers import SMALL_ROUTER
    from router_ml.data.loading import load_routing_data
    from router_ml.training import train

    cfg = {**copy.deepcopy(SMALL_ROUTER), "name": "refit", "refit": {"enabled": True}}
    metrics = train(cfg, run_dir=tmp_path)
    split_only = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["test/quality"] == split_only["test/quality"]  # the same held-out measurement
    assert metrics["time/refit_s"] > 0
    n_all = load_routing_data(cfg["data"], seed=0)["prompt_id"].nunique()
    refit, split = (LearnedRouter.from_pretrained(p / "checkpoint") for p in (tmp_path, trained_run))
    assert refit.metadata["training"]["refit"]["n_prompts"] == n_all
    assert refit.quality_head.X_train_.shape[0] == n_all > split.quality_head.X_train_.shape[0]
    assert refit.quality_head.get_params() == split.quality_head.get_params()
    assert refit.calibrator is not None and refit.calibrator.n_models_ == len(refit.models)
    assert "refitted on every labelled prompt" in (tmp_path / "checkpoint" / "README.md").read_text()
