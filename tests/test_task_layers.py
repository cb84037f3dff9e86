"""A task head that reads MiniLM's intermediate layer states: the encoder gives them from its one
forward pass (checked against Hugging Face's ``hidden_states``), the cache keeps them apart, and a
router with such a head trains, routes, saves and loads; mismatches are refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from router_ml import LearnedRouter
from router_ml.checkpoint import CheckpointError
from router_ml.data.labelled import load_labelled
from router_ml.data.taxonomy import TASK_TYPES
from router_ml.embeddings import CachedEncoder, SentenceTransformerEncoder, StaticEncoder
from router_ml.embeddings.base import LayeredEncoder, check_layers
from router_ml.predictors import TaskClassifier

TEXTS = [
    "Summarize this email in two sentences: the launch moved to Friday; send slides by Wednesday.",
    "Is this review positive or negative? 'The battery died after two days.'",
    "Write a Python function that merges two sorted lists.",
    " ".join(["the router reads a very long prompt"] * 80),  # > 256 tokens: truncated
]


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder()


def test_layer_states_are_hugging_face_hidden_states_pooled(minilm):
    import torch

    wide = minilm.encode_layers(TEXTS, [3, 4])
    assert wide.shape == (len(TEXTS), 3 * 384) and wide.dtype == np.float32
    np.testing.assert_allclose(wide[:, :384], minilm.encode(TEXTS), atol=1e-6)  # the embedding first
    st = minilm._load()
    tok, net = st[0].tokenizer, st[0].auto_model
    with torch.inference_mode():
        for i, text in enumerate(TEXTS):
            hidden = net(
                **tok([text], truncation=True, max_length=256, return_tensors="pt"), output_hidden_states=True
            )
            for j, k in enumerate((3, 4), start=1):
                ref = hidden.hidden_states[k][0].mean(0)
                ref = (ref / ref.norm()).numpy()
                np.testing.assert_allclose(wide[i, j * 384 : (j + 1) * 384], ref, atol=1e-4)
    # one prompt alone (the live path) gives the same row
    np.testing.assert_allclose(minilm.encode_layers(TEXTS[:1], [3, 4])[0], wide[0], atol=1e-5)


def test_layer_requests_are_checked(minilm):
    assert check_layers([3, 4]) == (3, 4)
    for bad in ([4, 3], [3, 3], [-1], ["x"]):
        with pytest.raises(ValueError, match="layers"):
            check_layers(bad)
    with pytest.raises(ValueError, match="has 6 layers"):
        minilm.encode_layers(TEXTS[:1], [7])
    with pytest.raises(ValueError, match="cannot give its layer states"):
        LayeredEncoder(StaticEncoder(), [3])
    with pytest.raises(ValueError, match="layers"):
        TaskClassifier(layers=[5, 2])


def test_cache_keeps_layer_states_apart_and_reuses_them(minilm, tmp_path, monkeypatch):
    cached = CachedEncoder(minilm, cache_dir=tmp_path)
    wide = cached.encode_layers(TEXTS, [3])
    np.testing.assert_allclose(wide, minilm.encode_layers(TEXTS, [3]), atol=1e-6)
    assert cached.encode(TEXTS).shape == (len(TEXTS), 384)  # the plain vectors under their own id
    assert LayeredEncoder(minilm, [3]).id == "st:all-MiniLM-L6-v2+layers:3"

    def no_forward(*a, **k):
        raise AssertionError("a cached text was encoded again")

    monkeypatch.setattr(minilm, "encode_layers", no_forward)
    np.testing.assert_array_equal(CachedEncoder(minilm, cache_dir=tmp_path).encode_layers(TEXTS, [3]), wide)


def with_layers(path, out, head: str, layers: list[int]):
    """A copy of the checkpoint at ``path`` in ``out`` whose router.json says ``head`` reads ``layers``."""
    shutil.copytree(path, out)
    cfg = json.loads((out / "router.json").read_text())
    cfg[head]["params"]["layers"] = layers
    (out / "router.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def layered_router(trained_run, embedding_cache, tmp_path_factory):
    """The trained router with its task head refitted on the embedding plus layer-3 states."""
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    cached = CachedEncoder(router.encoder)
    lab = load_labelled("project")
    head = TaskClassifier(labels=list(TASK_TYPES), class_weight="balanced", text_features=4096, layers=[3])
    head.fit(cached.encode_layers(list(lab["prompt"]), [3]), list(lab["task"]), texts=list(lab["prompt"]))
    router.task_head = head
    path = tmp_path_factory.mktemp("layered") / "checkpoint"
    router.save_pretrained(path)
    return router, path


def test_router_with_layer_states_routes_saves_and_loads(layered_router):
    router, path = layered_router
    prompts = load_labelled("fresh")["prompt"].tolist()[:20]
    assert json.loads((path / "router.json").read_text())["task_head"]["params"]["layers"] == [3]
    loaded = LearnedRouter.from_pretrained(path)
    assert loaded.task_layers == (3,)
    probs = router.predict_task_proba(prompts)
    np.testing.assert_allclose(loaded.predict_task_proba(prompts).to_numpy(), probs.to_numpy(), atol=1e-9)
    batch = loaded.route_batch(prompts)
    for p, d in zip(prompts, batch, strict=True):  # one prompt (the live path) as in the batch
        one = loaded.route(p)
        assert (one.model, one.task) == (d.model, d.task)
        assert one.task_confidence == pytest.approx(d.task_confidence, abs=1e-5)
    fresh = load_labelled("fresh")
    acc = np.mean(np.array(loaded.predict_task(fresh["prompt"].tolist())) == fresh["task"].to_numpy())
    assert acc > 0.8  # trained on the project prompts, tested on the blind set


def test_layer_mismatches_are_refused_by_name(layered_router, tmp_path):
    router, path = layered_router

    class SentenceVectorsOnly:  # the real MiniLM, without access to its layers
        id, dim = router.encoder.id, router.encoder.dim
        encode = router.encoder.encode

    with pytest.raises(CheckpointError, match="cannot give"):
        LearnedRouter.from_pretrained(path, encoder=SentenceVectorsOnly())
    with pytest.raises(CheckpointError, match="takes 768 features"):
        LearnedRouter.from_pretrained(with_layers(path, tmp_path / "bad", "task_head", [3, 4]))


# ---- quality heads that read layer states --------------------------------------------------------
def test_layer_columns_pick_each_heads_blocks():
    from router_ml.embeddings.base import layer_columns

    dim = 2
    wide = np.arange(3 * dim)[None, :]  # [embedding | layer 3 | layer 4]
    np.testing.assert_array_equal(wide[:, layer_columns((3, 4), (4,), dim)], [[0, 1, 4, 5]])
    np.testing.assert_array_equal(wide[:, layer_columns((3, 4), (), dim)], [[0, 1]])
    np.testing.assert_array_equal(wide[:, layer_columns((3, 4), (3, 4), dim)], wide)
    with pytest.raises(ValueError, match=r"layers \[2\] are not among the encoded layers \[3, 4\]"):
        layer_columns((3, 4), (2, 3), dim)


def test_ensemble_gives_each_member_its_own_layer_columns():
    from router_ml.predictors import (
        EnsembleQualityPredictor,
        TaskMixtureQualityPredictor,
        build_quality_predictor,
    )

    rng = np.random.default_rng(0)
    d, n = 8, 240
    tid = rng.integers(0, 3, n)
    centers = rng.normal(size=(3, 3 * d))
    wide = centers[tid] + 0.3 * rng.normal(size=(n, 3 * d))  # [embedding | layer 3 | layer 4]
    Y = (rng.random((n, 2)) < np.where(tid[:, None] == 0, [0.9, 0.2], [0.3, 0.7])).astype(float)
    members = [{"name": "taskmix", "params": {"layers": [4]}}, {"name": "knn", "params": {"k": 10}}]
    X = wide[:, np.r_[0:d, 2 * d : 3 * d]]  # the embedding and layer 4: what the ensemble reads
    ens = EnsembleQualityPredictor(members=members).fit(X, Y, tid)
    assert ens.layers == [4] and ens.dim_ == 2 * d
    with pytest.raises(ValueError):
        ens.predict(wide)  # the 3-block matrix is not
    tm = TaskMixtureQualityPredictor(layers=[4]).fit(X, Y, tid)
    kn = build_quality_predictor("knn", k=10).fit(X[:, :d], Y, tid)
    np.testing.assert_allclose(ens.predict(X), (tm.predict(X) + kn.predict(X[:, :d])) / 2, atol=1e-9)
    loaded = EnsembleQualityPredictor(**ens.get_params()).load_state_dict(ens.state_dict())
    np.testing.assert_allclose(loaded.predict(X), ens.predict(X), atol=1e-12)


@pytest.fixture(scope="module")
def layered_quality_router(embedding_cache, tmp_path_factory):
    """A small router trained in-process whose quality head (a task mixture) reads layer 3."""
    from experiments.bench_servers import SMALL_ROUTER
    from router_ml.training import train

    run = tmp_path_factory.mktemp("layered-quality")
    cfg = {
        **SMALL_ROUTER,
        "name": "test-layered-taskmix",
        "predictor": {"name": "taskmix", "task_key": "task", "params": {"layers": [3]}},
        "task_head": {"params": {"class_weight": "balanced", "layers": [4]}},
    }
    train(cfg, run_dir=run)
    return run / "checkpoint"


@pytest.mark.full
def test_router_whose_quality_head_reads_layers_routes_saves_and_loads(layered_quality_router, minilm):
    from router_ml.predictors import TaskMixtureQualityPredictor

    path = layered_quality_router
    cfg = json.loads((path / "router.json").read_text())
    assert cfg["quality_head"]["params"]["layers"] == [3]
    router = LearnedRouter.from_pretrained(path)
    assert router.quality_layers == (3,) and router.task_layers == (4,)
    prompts = load_labelled("fresh")["prompt"].tolist()[:20]
    # the quality head reads [embedding | layer 3] of one forward pass over layers 3 and 4
    wide = minilm.encode_layers(prompts, [3])
    np.testing.assert_allclose(router.quality_features(prompts), wide, atol=1e-5)
    head = router.quality_head
    assert isinstance(head, TaskMixtureQualityPredictor) and head.dim_ == 2 * 384
    raw = router.calibrator.transform(head.predict(wide))
    np.testing.assert_allclose(router.predict_quality(prompts).to_numpy(), np.clip(raw, 0, 1), atol=1e-5)
    batch = router.route_batch(prompts)
    for p, d in zip(prompts, batch, strict=True):  # one prompt (the live path) as in the batch
        one = router.route(p)
        assert one.model == d.model
        assert one.predicted_quality == pytest.approx(d.predicted_quality, abs=1e-5)


@pytest.mark.full
def test_quality_layer_mismatch_is_refused_by_name(layered_quality_router, tmp_path):
    bad = with_layers(layered_quality_router, tmp_path / "bad", "quality_head", [3, 4])
    with pytest.raises(CheckpointError, match="the quality head takes 768 features"):
        LearnedRouter.from_pretrained(bad)


@pytest.fixture(scope="module")
def layered_guard_router(embedding_cache, tmp_path_factory):
    """A small router trained in-process (and refitted on every prompt) whose novelty guard's
    distances read layer 3."""
    from experiments.bench_servers import SMALL_ROUTER
    from router_ml.training import train

    run = tmp_path_factory.mktemp("layered-guard")
    cfg = {
        **SMALL_ROUTER,
        "name": "test-layered-guard",
        "guard": {"enabled": True, "family_by": "source_task", "params": {"folds": 3, "layers": [3]}},
        "refit": {"enabled": True, "folds": 3},  # the exported checkpoint: refitted, guard included
    }
    train(cfg, run_dir=run)
    return run / "checkpoint"


@pytest.mark.full
def test_router_whose_guard_reads_layers_routes_saves_and_loads(layered_guard_router, minilm, tmp_path):
    from router_ml.predictors.guard import NoveltyGuard

    router = LearnedRouter.from_pretrained(layered_guard_router)
    assert router.guard_layers == (3,) and router.quality_layers == ()
    prompts = load_labelled("fresh")["prompt"].tolist()[:20]
    wide = minilm.encode_layers(prompts, [3])  # what the guard reads: [embedding | layer 3]
    nu = router.predict_novelty(prompts)
    np.testing.assert_allclose(nu, router.guard.novelty(wide, texts=prompts), atol=1e-5)
    # not what a guard of the embedding alone would say
    assert router.guard.bank_.shape[1] == 2 * 384 and isinstance(router.guard, NoveltyGuard)
    batch = router.route_batch(prompts)
    for p, d, v in zip(prompts, batch, nu, strict=True):  # one prompt (the live path) as in the batch
        one = router.route(p)
        assert one.model == d.model and one.novelty == pytest.approx(v, abs=1e-5)
    bad = with_layers(layered_guard_router, tmp_path / "bad", "guard", [3, 4])
    with pytest.raises(CheckpointError, match="the guard head takes 768 features"):
        LearnedRouter.from_pretrained(bad)
