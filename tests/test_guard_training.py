"""The novelty guard trained on real data (llmrouter_ulab, subsampled; static encoder): fitted
during training, stored in the checkpoint, carried by every decision; old checkpoints still load.
Full tier (it trains)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from router_ml import LearnedRouter
from router_ml.training import _as_dict, train

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory, shared_data, embedding_cache) -> tuple[Path, dict]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "data.max_prompts=700",
                "encoder=static",
                "task_head.params.layers=[]",
                "predictor=knn",
                "predictor.params.k=10",
                "split.holdout_tasks=[mmlu]",
                "guard.enabled=true",
                "guard.params.folds=3",
                "guard.params.layers=[]",  # the static encoder has no layers
                "guard.params.mode=shrink",
            ],
        )
    run = tmp_path_factory.mktemp("guarded")
    return run, train(_as_dict(cfg), run_dir=run)


def test_training_fits_the_guard_by_family_cv_and_reports_it(guarded_run):
    _, m = guarded_run
    assert 0.5 <= m["cv/guard_novelty_auroc"] <= 1.0
    assert 0.0 <= m["cv/guard_shrink_in_distribution"] <= m["cv/guard_shrink_novel"] <= 1.0
    assert 0.5 <= m["ood/novelty_auroc"] <= 1.0  # mmlu, held out whole, against the test prompts
    assert 0.75 <= m["test/interval_coverage"] <= 1.0  # nominal 0.9, in distribution
    # test/ routes as served (through the guard); the router before its guard is kept beside it
    assert {"test/unguarded/quality", "ood/unguarded/quality"} <= set(m)


def test_checkpoint_keeps_the_guard_and_decisions_carry_it(guarded_run):
    run, _ = guarded_run
    config = json.loads((run / "checkpoint" / "router.json").read_text())
    assert config["guard"]["type"] == "novelty_shrinkage"
    assert any(k.startswith("guard.") for k in config["array_shapes"])
    router = LearnedRouter.from_pretrained(run / "checkpoint")
    d = router.route("Which of these is a mammal? (A) shark (B) dolphin (C) trout (D) eel")
    assert 0.0 <= d.novelty <= 1.0
    assert set(d.quality_interval) == set(router.models)
    lo, hi = d.quality_interval[d.model]
    assert lo <= d.predicted_quality[d.model] <= hi
    nov = router.predict_novelty(["Write a haiku about the sea.", "What is 2 + 2?"])
    assert nov.shape == (2,) and ((nov >= 0) & (nov <= 1)).all()


def test_a_checkpoint_without_a_guard_still_loads(guarded_run, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from router_ml.checkpoint import _sha256

    run, _ = guarded_run
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoint", old)
    config = json.loads((old / "router.json").read_text())
    arrays = {
        k: v for k, v in load_file(str(old / "weights.safetensors")).items() if not k.startswith("guard.")
    }
    save_file(arrays, str(old / "weights.safetensors"))
    del config["guard"]  # written before the guard existed
    config["array_shapes"] = {k: v for k, v in config["array_shapes"].items() if not k.startswith("guard.")}
    config["weights_sha256"] = _sha256(old / "weights.safetensors")
    (old / "router.json").write_text(json.dumps(config))
    router = LearnedRouter.from_pretrained(old)
    assert router.guard is None
    d = router.route("What is 2 + 2?")
    assert d.novelty is None and d.quality_interval is None and not d.fell_back_to_prior
    assert np.isfinite(d.predicted_quality[d.model])
