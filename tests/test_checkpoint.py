"""Checkpoints: complete, verified on load, and rejected with a clear error when damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from router_ml import LearnedRouter
from router_ml.checkpoint import SCHEMA_VERSION, CheckpointError, read_config
from router_ml.export import export_run


@pytest.fixture()
def ckpt(trained_run, tmp_path) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(trained_run / "checkpoint", dest)
    return dest


def _edit_json(path: Path, fn) -> None:
    cfg = json.loads((path / "router.json").read_text())
    fn(cfg)
    (path / "router.json").write_text(json.dumps(cfg))


def test_router_json_records_what_loading_needs(trained_run):
    cfg = read_config(trained_run / "checkpoint")
    assert cfg["schema_version"] == SCHEMA_VERSION
    assert cfg["encoder"]["dim"] == 384 and cfg["encoder"]["id"]
    assert cfg["quality_head"]["type"] == "knn" and cfg["quality_head"]["params"]["k"] == 10
    assert len(cfg["models"]) >= 2 and cfg["task_labels"]
    for key in ("router-ml", "numpy", "torch"):
        assert key in cfg["package_versions"]
    assert len(cfg["training"]["data_hash"]) == 64
    assert "test/quality" in cfg["metrics"]
    # no absolute paths recorded (the policy fit set's prompts are text: a quote inside one splits it)
    recorded = json.dumps({k: v for k, v in cfg.items() if k != "policy_fit"})
    assert all(not k.startswith("/") for k in recorded.split('"'))


def test_weights_are_safetensors_not_pickle(trained_run):
    files = sorted(p.name for p in (trained_run / "checkpoint").iterdir())  # the policy fit set included
    assert files == ["README.md", "router.json", "weights.safetensors"]


def test_flipped_byte_in_weights_is_detected(ckpt):
    w = ckpt / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        LearnedRouter.from_pretrained(ckpt)


def test_truncated_router_json_is_detected(ckpt):
    p = ckpt / "router.json"
    p.write_text(p.read_text()[:100])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LearnedRouter.from_pretrained(ckpt)


def test_missing_files_are_named(ckpt, tmp_path):
    (ckpt / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"weights\.safetensors is missing"):
        LearnedRouter.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=r"router\.json is missing"):
        LearnedRouter.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        LearnedRouter.from_pretrained(tmp_path / "nowhere")


def test_other_schema_version_is_refused(ckpt):
    _edit_json(ckpt, lambda c: c.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(CheckpointError, match="schema_version"):
        LearnedRouter.from_pretrained(ckpt)


def test_model_list_mismatch_is_refused(ckpt):
    _edit_json(ckpt, lambda c: c.update(models=[*c["models"], "extra-model"]))
    with pytest.raises(CheckpointError, match="quality head predicts"):
        LearnedRouter.from_pretrained(ckpt)


def test_shape_mismatch_is_refused(ckpt):
    def shrink(c):
        key = next(iter(c["array_shapes"]))
        c["array_shapes"][key] = [1]

    _edit_json(ckpt, shrink)
    with pytest.raises(CheckpointError, match="has shape"):
        LearnedRouter.from_pretrained(ckpt)


def test_encoder_dimension_mismatch_is_refused(ckpt):
    from router_ml.embeddings import build_encoder

    with pytest.raises(CheckpointError, match="384-dim"):
        LearnedRouter.from_pretrained(ckpt, encoder=build_encoder("static"))


def test_export_copies_a_verified_checkpoint_with_card_and_metrics(trained_run, tmp_path):
    dest = export_run(trained_run, tmp_path / "exported")
    assert (dest / "README.md").read_text().startswith("---")
    assert json.loads((dest / "metrics.json").read_text())["test/quality"] > 0
    a = LearnedRouter.from_pretrained(dest).predict_quality(["Translate 'hello' to French."]).to_numpy()
    b = LearnedRouter.from_pretrained(trained_run / "checkpoint").predict_quality(
        ["Translate 'hello' to French."]
    )
    np.testing.assert_array_equal(a, b.to_numpy())
    with pytest.raises(FileExistsError, match="exists"):
        export_run(trained_run, dest)


def test_export_refuses_a_corrupted_checkpoint(ckpt, tmp_path):
    (ckpt / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        export_run(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_policy_fit_set_holds_the_routers_own_predictions(trained_run):
    cfg = read_config(trained_run / "checkpoint")
    assert cfg["policy_fit"]["n_prompts"] == len(cfg["policy_fit"]["prompts"]) == 240  # 40 per task type
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    fit = router.policy_fit
    assert fit.models == router.models and fit.quality.shape == (240, len(router.models))
    assert sorted(set(fit.tasks)) == sorted(router.task_labels)
    # what the loaded router predicts for those prompts now, from one encoder pass as at training time
    quality, tasks = router.predict_quality_and_task(fit.prompts)
    np.testing.assert_allclose(quality, fit.quality, atol=1e-6)
    assert tasks == fit.tasks
    assert "Policy fit set: 240 prompts" in (trained_run / "checkpoint" / "README.md").read_text()


def test_export_adds_a_policy_fit_set_to_an_older_checkpoint(trained_run, tmp_path):
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    router.policy_fit = None  # as checkpoints were written before they carried one
    old = router.save_pretrained(tmp_path / "old")
    assert "policy_fit" not in read_config(old) and LearnedRouter.from_pretrained(old).policy_fit is None
    new = LearnedRouter.from_pretrained(export_run(old, tmp_path / "new"))
    want = LearnedRouter.from_pretrained(trained_run / "checkpoint").policy_fit
    assert new.policy_fit.prompts == want.prompts and new.policy_fit.tasks == want.tasks
    np.testing.assert_allclose(new.policy_fit.quality, want.quality, atol=1e-6)
    assert read_config(tmp_path / "new")["metrics"] == read_config(trained_run / "checkpoint")["metrics"]


def test_a_damaged_policy_fit_set_is_named(ckpt):
    _edit_json(ckpt, lambda c: c["policy_fit"].update(tasks=c["policy_fit"]["tasks"][:-1]))
    with pytest.raises(CheckpointError, match=r"policy fit set.*239 tasks for 240 prompts"):
        LearnedRouter.from_pretrained(ckpt)


def test_policy_fit_set_checks_its_shapes():
    from router_ml.decision.fit_set import PolicyFitSet

    ok = PolicyFitSet(["a", "b"], ["qa", "code"], np.zeros((2, 3)), ["m0", "m1", "m2"])
    assert ok.to_config()["n_prompts"] == 2
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(2, 3\)"):
        PolicyFitSet(["a", "b"], ["qa", "code"], np.zeros((2, 2)), ["m0", "m1", "m2"])
    with pytest.raises(ValueError, match="non-finite"):
        PolicyFitSet(["a"], ["qa"], np.array([[np.nan, 0, 0]]), ["m0", "m1", "m2"])
