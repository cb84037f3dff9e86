"""LearnedRouter: predictions, decisions, errors and the save/load round trip (real encoder)."""

from __future__ import annotations

import numpy as np
import pytest

from router_ml import LearnedRouter, RoutingDecision
from router_ml.data.taxonomy import TASK_TYPES
from router_ml.router import RoutingError

PROMPTS = [
    "Classify the sentiment of this review as positive or negative: the battery died after two days.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "If a train leaves at 3pm going 60 mph, how far has it gone by 5:30pm?",
]


@pytest.fixture(scope="module")
def router(trained_run) -> LearnedRouter:
    return LearnedRouter.from_pretrained(trained_run / "checkpoint")


def test_predict_quality_shape_columns_and_range(router):
    q = router.predict_quality(PROMPTS)
    assert list(q.columns) == router.models
    assert q.shape == (len(PROMPTS), len(router.models))
    assert ((q.to_numpy() >= 0) & (q.to_numpy() <= 1)).all()


def test_predict_task_proba_rows_sum_to_one(router):
    p = router.predict_task_proba(PROMPTS)
    assert list(p.columns) == list(TASK_TYPES)
    np.testing.assert_allclose(p.sum(axis=1).to_numpy(), 1.0, atol=1e-6)
    assert router.predict_task(PROMPTS) == list(p.idxmax(axis=1))


def test_task_head_recognises_clear_cases(router):
    assert router.predict_task(PROMPTS) == ["classify", "code", "reason"]


def test_route_picks_highest_predicted_quality(router):
    d = router.route(PROMPTS[1])
    assert isinstance(d, RoutingDecision)
    q = router.predict_quality(PROMPTS[1]).iloc[0]
    assert d.model == q.idxmax()
    assert d.predicted_quality[d.model] == pytest.approx(q.max())
    assert set(d.fallbacks) == set(router.models) - {d.model}
    assert d.model in d.reason and d.task in d.reason


def test_route_respects_allowed_and_excluded_models(router):
    allowed = router.models[:2]
    d = router.route(PROMPTS[0], allowed_models=allowed)
    assert d.model in allowed and set(d.predicted_quality) == set(allowed)
    best = router.route(PROMPTS[0]).model
    assert router.route(PROMPTS[0], exclude_models=[best]).model != best


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "prompt 0 is empty"),
        ({"prompt": "   \n"}, "prompt 0 is empty"),
        ({"prompt": "hi", "allowed_models": ["no-such-model"]}, "unknown model 'no-such-model'"),
        ({"prompt": "hi", "max_cost_usd": 0.01}, "need a policy"),
    ],
)
def test_route_rejects_bad_input_with_clear_error(router, kwargs, message):
    with pytest.raises(RoutingError, match=message):
        router.route(**kwargs)


def test_save_load_round_trip_identical(router, tmp_path):
    router.save_pretrained(tmp_path / "copy")
    again = LearnedRouter.from_pretrained(tmp_path / "copy")
    assert again.models == router.models
    np.testing.assert_array_equal(
        again.predict_quality(PROMPTS).to_numpy(), router.predict_quality(PROMPTS).to_numpy()
    )
    np.testing.assert_array_equal(
        again.predict_task_proba(PROMPTS).to_numpy(), router.predict_task_proba(PROMPTS).to_numpy()
    )
    assert (tmp_path / "copy" / "README.md").read_text().count(router.models[0]) >= 1


def test_route_batch_matches_route(router):
    batch = router.route_batch(PROMPTS)
    assert [d.model for d in batch] == [router.route(p).model for p in PROMPTS]


def test_route_batch_decisions_match_the_estimates(router):
    allowed = list(reversed(router.models[:4]))  # not in the router's order
    decisions = router.route_batch(PROMPTS, allowed_models=allowed)
    quality = router.predict_quality(PROMPTS)[allowed]
    task_p = router.predict_task_proba(PROMPTS)
    for d, (_, q), (_, p) in zip(decisions, quality.iterrows(), task_p.iterrows(), strict=True):
        ranked = sorted(allowed, key=lambda m: (-q[m], router.models.index(m)))
        assert [d.model, *d.fallbacks] == ranked
        assert list(d.predicted_quality) == allowed
        assert d.predicted_quality == pytest.approx(q.to_dict())
        assert (d.task, d.task_confidence) == (p.idxmax(), pytest.approx(p.max()))
        assert f"{d.model} at {q[d.model]:.2f}" in d.reason


def test_route_batch_breaks_ties_by_router_model_order(router):
    m = len(router.models)
    quality = np.full((2, m), 0.5)
    quality[1, m - 1] = 0.9
    task_p = np.eye(len(router.task_labels))[:2]
    cand = list(range(m))[::-1]
    first, second = router._decisions(task_p, quality, cand)
    assert [first.model, *first.fallbacks] == router.models  # all tied: the router's order
    assert [second.model, *second.fallbacks] == [router.models[-1], *router.models[:-1]]
    assert (first.task, second.task) == (router.task_labels[0], router.task_labels[1])


def test_cli_route_and_info(trained_run, capsys):
    import json

    from router_ml.cli import main

    ckpt = str(trained_run / "checkpoint")
    assert main(["route", "--ckpt", ckpt, PROMPTS[1]]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["task"] == "code" and decision["model"] in decision["predicted_quality"]
    assert main(["info", ckpt]) == 0
    assert json.loads(capsys.readouterr().out)["quality_head"]["type"] == "knn"
    assert main(["route", "--ckpt", ckpt, " "]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err


def test_text_reading_quality_head_gets_the_prompts_and_round_trips(router, tmp_path):
    from router_ml.predictors import build_quality_predictor

    verbs = ["summarise this report", "label this ticket", "write a poem about"]
    texts = [f"{v} number {i}" for v in verbs for i in range(12)]
    tid = np.repeat(np.arange(3), 12)
    Y = np.full((len(texts), len(router.models)), 0.2)
    Y[np.arange(len(texts)), tid % len(router.models)] = 0.9
    head = build_quality_predictor("taskmix", text_features=1024).fit(
        router.embed(texts), Y, tid, texts=texts
    )
    r = LearnedRouter(router.encoder, router.task_head, head, router.models)
    q = r.predict_quality(PROMPTS).to_numpy()
    np.testing.assert_array_equal(q, head.predict(router.embed(PROMPTS), texts=PROMPTS))
    expect = [router.models[j] for j in q.argmax(axis=1)]
    assert [d.model for d in r.route_batch(PROMPTS)] == expect
    assert r.route(PROMPTS[2]).model == expect[2]
    with pytest.raises(ValueError, match="pass texts"):  # the head cannot run on embeddings alone
        r._quality_from_embeddings(router.embed(PROMPTS))
    r.save_pretrained(tmp_path / "text")
    again = LearnedRouter.from_pretrained(tmp_path / "text")
    assert again.quality_head.uses_text and again.quality_head.get_params() == head.get_params()
    np.testing.assert_array_equal(again.predict_quality(PROMPTS).to_numpy(), q)
    assert [d.model for d in again.route_batch(PROMPTS)] == expect
