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
    assert all(not k.startswith("/") for k in json.dumps(cfg).split('"'))  # no absolute paths recorded


def test_weights_are_safetensors_not_pickle(trained_run):
    files = sorted(p.name for p in (trained_run / "checkpoint").iterdir())
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
