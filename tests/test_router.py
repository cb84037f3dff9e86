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
