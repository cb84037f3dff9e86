"""The evaluation harness end to end: real encoder, real router, real policies; simulated outcomes
in-process (fast) and the Hydra entry point as a user runs it (single run and a joblib sweep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from router_ml.evaluation.harness import evaluate

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


SMALL = [
    "data=simulated",
    "seeds=[0,1]",
    "pacing.requests=3000",
    "compare_heads.knn.params.k=10",
    "policies.utility.sweep.num=12",
]


@pytest.fixture(scope="module")
def sim_eval(tmp_path_factory, embedding_cache):
    run = tmp_path_factory.mktemp("eval-sim")
    summary = evaluate(_cfg(SMALL), run_dir=run)
    return run, summary


def test_run_folder_has_every_output(sim_eval):
    run, _ = sim_eval
    for name in ("metrics.json", "frontier.parquet", "per_task.parquet", "frontier_test.png"):
        assert (run / name).stat().st_size > 0, name
    for name in ("per_task_test.png", "reliability_test.png"):
        assert (run / name).stat().st_size > 1000, name
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["seeds"] == [0, 1] and set(on_disk["splits"]) == {"test"}


def test_every_policy_and_single_model_is_on_the_frontier(sim_eval):
    run, _ = sim_eval
    fdf = pd.read_parquet(run / "frontier.parquet")
    routers = set(fdf["router"])
    for r in (
        "utility",
        "utility[knn]",
        "cost_aware",
        "budget_ratio",
        "capability",
        "latency_aware",
        "threshold",
        "threshold[knn]",
        "random",
        "oracle",
    ):
        assert r in routers, r
    assert sum(r.startswith("single:") for r in routers) == 7
    assert set(fdf["seed"]) == {0, 1}
    assert (fdf["cost"] >= 0).all() and fdf["quality"].between(0, 1).all()


def test_frontier_behaves(sim_eval):
    run, summary = sim_eval
    fdf = pd.read_parquet(run / "frontier.parquet")
    for seed, d in fdf.groupby("seed"):
        oracle = d.loc[d["router"] == "oracle", "quality"].iloc[0]
        assert d["quality"].max() <= oracle + 1e-12  # nothing beats the oracle
        u = d[d["router"] == "utility"].sort_values("knob_num")
        # a higher price on cost never makes the utility policy spend more
        assert np.all(np.diff(u["cost"].to_numpy()) <= 1e-12), seed
        assert u["cost"].iloc[0] > u["cost"].iloc[-1]
        r = d[d["router"] == "random"].sort_values("knob_num")
        assert r["strong_share"].iloc[0] == 0.0 and r["strong_share"].iloc[-1] == 1.0
    m = summary["splits"]["test"]
    assert m["oracle/quality"]["mean"] >= m["best_single/quality"]["mean"]
    for key in (
        "utility/aiq",
        "zero/aiq",
        "utility[knn]/aiq",
        "threshold/apgr",
        "random/apgr",
        "threshold/cpt50",
    ):
        assert np.isfinite(m[key]["mean"]), key
    # two seeds: a real interval around the mean
    assert m["utility/aiq"]["ci_lo"] <= m["utility/aiq"]["mean"] <= m["utility/aiq"]["ci_hi"]
    assert abs(m["random/apgr"]["mean"] - 0.5) < 0.1  # RouteLLM: random is about 0.5


def test_budget_pacing_replay_keeps_the_cap_and_tracks_the_target(sim_eval):
    _, summary = sim_eval
    p = summary["pacing"]
    assert p["requests"]["mean"] == 3000
    assert p["never_over_cap"]["mean"] == 1.0
    assert abs(p["spend_vs_target"]["mean"] - 1.0) < 0.05


def test_cost_aware_sweep_stays_within_each_budget(sim_eval):
    run, _ = sim_eval
    fdf = pd.read_parquet(run / "frontier.parquet")
    ca = fdf[fdf["router"] == "cost_aware"]
    assert (ca["spend_over_budget"] <= 1.0 + 1e-9).all()
    br = fdf[fdf["router"] == "budget_ratio"].sort_values("knob_num")
    assert br["cost"].iloc[-1] >= br["cost"].iloc[0]  # a bigger session budget buys more expensive calls


def test_per_task_breakdown_covers_every_task(sim_eval):
    run, _ = sim_eval
    pt = pd.read_parquet(run / "per_task.parquet")
    assert set(pt["task"]) == {"classify", "summarize", "code", "reason", "creative", "qa"}
    assert {"best single", "oracle"} <= set(pt["router"])
    assert any(r.startswith("utility @") for r in pt["router"])


def test_evaluate_a_trained_checkpoint(tmp_path, trained_run):
    summary = evaluate(
        _cfg([*SMALL, f"checkpoint={trained_run / 'checkpoint'}", "pacing=null"]), run_dir=tmp_path
    )
    assert summary["seeds"] == [0]  # a checkpoint is one trained router, one split
    m = summary["splits"]["test"]
    assert m["n_prompts"]["mean"] > 100 and np.isfinite(m["utility/aiq"]["mean"])


def test_checkpoint_without_recorded_split_is_refused(tmp_path, trained_run):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run / "checkpoint", ckpt)
    meta = json.loads((ckpt / "router.json").read_text())
    del meta["training"]["split"]
    (ckpt / "router.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not record its data and split"):
        evaluate(_cfg([*SMALL, f"checkpoint={ckpt}", "pacing=null"]), run_dir=tmp_path / "out")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_hydra_entry_point_and_parallel_sweep(tmp_path, embedding_cache):
    fast = ["data=simulated", "seeds=[0]", "pacing.requests=500", "compare_heads.knn.params.k=10"]
    _run(["-m", "experiments.evaluate", *fast, f"hydra.run.dir={tmp_path / 'single'}"], ROOT)
    assert json.loads((tmp_path / "single" / "metrics.json").read_text())["splits"]["test"]
    _run(
        [
            "-m",
            "experiments.evaluate",
            "-m",
            "hydra/launcher=joblib2",
            *fast,
            "predictor=knn,linear",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        ROOT,
    )
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.cpus_per_task == 4 and "submitit" in cfg.hydra.launcher._target_
