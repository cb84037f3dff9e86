"""The live one-prompt path (``proba_one``, ``predict_one``, ``transform_one``, ``decide_one``) gives
the decisions of the batch path, field for field, for every head, calibrator and policy kind."""

from __future__ import annotations

import numpy as np
import pytest

from router_ml import LearnedRouter
from router_ml.data.labelled import load_labelled
from router_ml.decision import DecisionLayer, ModelPool, build_policy
from router_ml.decision.base import PolicyError
from router_ml.embeddings import CachedEncoder
from router_ml.predictors import (
    QUALITY_PREDICTORS,
    IsotonicCalibrator,
    NotFittedError,
    TaskClassifier,
    TemperatureCalibrator,
    build_quality_predictor,
)

WORDS = ["summarize", "classify", "write", "solve", "explain", "translate", "label", "debug"]


def _problem(n: int = 240, d: int = 12, m: int = 4, seed: int = 0):
    """Clustered embeddings, scores with 20% missing, task ids and short texts (seeded)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, d)) * 3
    task = rng.integers(0, 4, n)
    X = (centres[task] + rng.normal(size=(n, d))).astype(np.float32)
    Y = np.clip(rng.uniform(0.2, 0.6, size=(n, m)) + 0.3 * (np.arange(m)[None, :] == task[:, None]), 0, 1)
    Y[rng.uniform(size=Y.shape) < 0.2] = np.nan
    texts = [f"please {WORDS[t]} this {WORDS[(t + i) % len(WORDS)]} now" for i, t in enumerate(task)]
    return X, Y, task, texts


@pytest.mark.parametrize("name", sorted(QUALITY_PREDICTORS))
def test_every_quality_head_predicts_one_row_as_its_batch(name):
    X, Y, task, _ = _problem()
    params = {"mlp": {"epochs": 5}, "mf": {"epochs": 5}}.get(name, {})
    head = build_quality_predictor(name, **params).fit(X, Y, task)
    for x in X[:25]:
        np.testing.assert_allclose(head.predict_one(x), head.predict(x[None, :])[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("weights", ["uniform", "distance", "softmax"])
@pytest.mark.parametrize("missing", [False, True])
def test_knn_one_row_is_the_batch_row(weights, missing):
    X, Y, _, _ = _problem(seed=1)
    if not missing:
        Y = np.nan_to_num(Y, nan=0.5)
    knn = build_quality_predictor("knn", k=15, weights=weights).fit(X, Y)
    for x in X[:40]:
        # the same neighbours and weights; the weighted mean may differ in the last bit
        np.testing.assert_allclose(knn.predict_one(x), knn.predict(x[None, :])[0], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"one embedding of shape \(12,\)"):
        knn.predict_one(X[:2])


def test_task_classifier_and_taskmix_with_text_features_match_their_batch():
    X, Y, task, texts = _problem(seed=2)
    labels = ["a", "b", "c", "d"]
    clf = TaskClassifier(labels=labels, text_features=512, cue_scale=0.25)
    with pytest.raises(NotFittedError):
        clf.proba_one(X[0].astype(np.float64), texts[0])
    clf.fit(X, [labels[t] for t in task], texts=texts)
    mix = build_quality_predictor("taskmix", text_features=512, cue_scale=0.25).fit(X, Y, task, texts=texts)
    for x, t in zip(X[:30], texts[:30], strict=True):
        p = clf.proba_one(x, t)
        np.testing.assert_allclose(p, clf.predict_proba(x[None, :], texts=[t])[0], rtol=0, atol=1e-12)
        assert p.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(
            mix.predict_one(x, t), mix.predict(x[None, :], texts=[t])[0], rtol=0, atol=1e-12
        )
    with pytest.raises(ValueError, match="pass the prompt texts"):
        clf.proba_one(X[0])
    with pytest.raises(ValueError, match="pass texts"):
        mix.predict_one(X[0])
    with pytest.raises(ValueError, match="one embedding"):
        clf.proba_one(X[0][:5], texts[0])


def test_calibrators_transform_one_row_as_their_batch():
    rng = np.random.default_rng(3)
    pred = rng.uniform(size=(300, 4))
    target = np.clip(pred**2 + rng.normal(0, 0.05, size=pred.shape), 0, 1)
    target[:, 3] = np.nan  # a column without outcomes keeps the identity
    for cal in (IsotonicCalibrator().fit(pred, target), TemperatureCalibrator().fit(pred, target)):
        for row in rng.uniform(-0.1, 1.1, size=(30, 4)):
            np.testing.assert_array_equal(cal.transform_one(row), cal.transform(row[None, :])[0])
    with pytest.raises(ValueError, match=r"expected shape \(4,\)"):
        IsotonicCalibrator().fit(pred, target).transform_one(pred[:2])


# ---- the whole decision, on the real trained router -----------------------------------------


@pytest.fixture(scope="module")
def router(trained_run, embedding_cache) -> LearnedRouter:
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    router.encoder = CachedEncoder(router.encoder)
    return router


def _batch_reference(router, layer, prompt, allowed=None, **constraints):
    """What the batch path decides for one prompt (the one-row methods are not used)."""
    X = router.embed([prompt])
    cand = [router.models.index(m) for m in (allowed or router.models)]
    quality = router._quality_from_embeddings(X, texts=[prompt])[:, cand]
    task_p = router.task_head.predict_proba(X, texts=[prompt])
    models = [router.models[j] for j in cand]
    return layer.decide_batch([prompt], quality, models, task_p, router.task_labels, **constraints)[0]


def _same(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    assert da.keys() == db.keys()
    for key, value in da.items():
        if key == "predicted_quality":
            assert value.keys() == db[key].keys()
            assert all(abs(value[m] - db[key][m]) <= 1e-12 for m in value), key
        elif isinstance(value, float):
            assert abs(value - db[key]) <= 1e-12 * max(1.0, abs(value)), key
        else:
            assert value == db[key], key


CASES = [
    ("utility", {}, {}),
    ("utility", {}, {"lam": 300.0}),
    ("utility", {}, {"lam": 1e9}),
    ("utility", {}, {"max_cost_usd": 1e-4}),
    ("utility", {}, {"slo": "realtime"}),
    ("utility", {}, {"latency_slo_s": 2.0, "lam": 50.0}),
    ("utility", {}, {"target_quality": 0.7}),
    ("utility", {}, {"target_quality": 0.999}),  # nothing reaches it: the best predicted
    ("utility", {}, {"max_cost_usd": 1e-12}),  # nothing is usable: the cheapest, and the reason says so
    ("utility", {}, {"latency_slo_s": 1e-6}),  # nothing is usable: the fastest
    ("capability", {}, {}),
    ("latency_aware", {}, {}),
    ("threshold", {}, {}),
    ("cost_aware", {"budget_usd": 0.05}, {}),  # stateful: the one-prompt call takes the batch path
]


@pytest.mark.parametrize(("policy", "params", "constraints"), CASES)
def test_one_prompt_decisions_equal_the_batch_path(router, policy, params, constraints):
    layer = DecisionLayer(build_policy({"name": policy, **params}), ModelPool.simulated()).fit_router(router)
    prompts = load_labelled("project").groupby("task").head(8)["prompt"].tolist()
    chosen = set()
    for prompt in prompts:
        want = _batch_reference(router, layer, prompt, **constraints)
        if layer.policy.stateful:
            layer.policy.reset()  # the reference and the live call start from the same state
        got = router.route(prompt, policy=layer, **constraints)
        _same(got, want)
        chosen.add(got.model)
    if policy == "utility" and not constraints:
        assert len(chosen) > 1  # the prompts do tell the models apart


def test_one_prompt_with_models_allowed_per_task_equals_the_batch_path(router):
    allowed = {"code": router.models[:2], "qa": router.models[-1:]}
    layer = DecisionLayer(
        build_policy({"name": "utility", "lam": 10.0, "allowed_per_task": allowed}), ModelPool.simulated()
    )
    layer.fit_router(router)
    tasks = set()
    for prompt in load_labelled("project").groupby("task").head(6)["prompt"].tolist():
        got = router.route(prompt, policy=layer)
        _same(got, _batch_reference(router, layer, prompt))
        tasks.add(got.task)
        if got.task in allowed:
            assert got.model in allowed[got.task]
    assert {"code", "qa"} <= tasks
    bad = DecisionLayer(
        build_policy({"name": "utility", "allowed_per_task": {"qa": ["no-such-model"]}}),
        ModelPool.simulated(),
    )
    with pytest.raises(PolicyError, match="no-such-model"):
        router.route("What is the capital of France?", policy=bad.fit_router(router))


def test_one_prompt_with_some_candidates_equals_the_batch_path(router):
    layer = DecisionLayer(build_policy({"name": "utility", "lam": 100.0}), ModelPool.simulated())
    layer.fit_router(router)
    allowed = router.models[1:4]
    for prompt in load_labelled("fresh")["prompt"].tolist()[:12]:
        _same(
            router.route(prompt, policy=layer, allowed_models=allowed),
            _batch_reference(router, layer, prompt, allowed),
        )


@pytest.mark.parametrize(
    "text",
    [
        "Summarize this: the cat sat on the mat.",
        "请总结这篇文章，并分类。 Then classify it: spam or not?",
        "İSTANBUL'da HAVA nasıl? What is the weather like in İstanbul today?",
        "def f(x):\n    return x  # Traceback: fix this bug " + "word " * 200 + "Write a poem about it.",
        "ok",
        "",
    ],
)
def test_fused_text_terms_are_the_batch_features(text):
    from router_ml.predictors.task_text import cue_features, hashed_view, text_terms_one

    (idx,), (w,) = hashed_view([text], 2**15, 16, 1.5)
    got_idx, got_w, got_cues = text_terms_one(text, 2**15, 16, 1.5, cues=True)
    assert got_idx == idx.tolist() and got_w == w
    assert got_cues == cue_features([text], 16)[0].tolist()
    assert text_terms_one(text, 0, 16, 1.5, cues=False) == ([], 0.0, None)
