"""DecisionLayer with the real trained router, the simulator's pool, the real cost and latency
models and a SQLite spend ledger: decisions, per-request constraints, live latency, restarts."""

from __future__ import annotations

import pytest

from router_ml import LearnedRouter, RoutingDecision
from router_ml.decision import (
    BudgetExhausted,
    DecisionLayer,
    ModelPool,
    PolicyError,
    build_policy,
)
from router_ml.decision.costs import CostModel
from router_ml.decision.ledger import BudgetLedger
from router_ml.embeddings import CachedEncoder
from router_ml.router import RoutingError

CLASSIFY = "Classify the sentiment of this review as positive or negative: the battery died after two days."
CODE = "Write a Python function that merges two sorted lists into one sorted list."
REASON = "If a train leaves at 3pm going 60 mph, how far has it gone by 5:30pm?"
CREATIVE = "Write a short story about a lighthouse keeper who befriends a whale."
SUMMARY = (
    "Summarize the following email in two sentences: Hi team, the quarterly review is moved to "
    "Friday; please send slides by Wednesday and book the large room."
)
PROMPTS = {"classify": CLASSIFY, "code": CODE, "reason": REASON, "creative": CREATIVE, "summarize": SUMMARY}


@pytest.fixture(scope="module")
def router(trained_run, embedding_cache) -> LearnedRouter:
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    # the training run cached the project's prompts: fitting a policy on them costs no encoding
    router.encoder = CachedEncoder(router.encoder)
    return router


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool.simulated()


@pytest.fixture
def make_layer(router, pool):
    def make(cfg, **kwargs) -> DecisionLayer:
        return DecisionLayer(build_policy(cfg), pool, **kwargs).fit_router(router)

    return make


def test_router_and_pool_hold_the_same_models(router, pool):
    assert sorted(router.models) == sorted(pool.names)
    assert router.predict_task(list(PROMPTS.values())) == list(PROMPTS)


def test_route_with_a_policy_returns_a_complete_decision(router, pool, make_layer):
    layer = make_layer({"name": "utility", "lam": 0.0})
    d = router.route(CODE, policy=layer)
    assert isinstance(d, RoutingDecision) and d.policy == "utility" and d.task == "code"
    q = router.predict_quality(CODE).iloc[0]
    assert d.predicted_quality == pytest.approx(q.to_dict())
    assert d.predicted_quality[d.model] == pytest.approx(q.max())  # lam = 0: the best predicted
    assert 1 <= len(d.fallbacks) <= 3 and d.model not in d.fallbacks
    assert len(set(d.fallbacks)) == len(d.fallbacks) and set(d.fallbacks) <= set(pool.names)
    assert pool.get(d.fallbacks[-1]).kind == "local"  # the last resort needs no network
    assert "utility" in d.reason and d.model in d.reason and "task code" in d.reason
    expected = CostModel(pool).estimate([CODE], ["code"]).cost_usd[0, pool.index(d.model)]
    assert d.expected_cost_usd == pytest.approx(expected) and d.expected_cost_usd > 0
    assert d.expected_ttft_s == pytest.approx(pool.get(d.model).ttft_s)  # the prior: nothing measured
    assert d.expected_latency_s > d.expected_ttft_s
    assert d.to_dict()["fallbacks"] == d.fallbacks


def test_route_batch_with_a_policy_matches_route(router, make_layer):
    layer = make_layer({"name": "utility", "lam": 300.0})
    batch = router.route_batch(list(PROMPTS.values()), policy=layer)
    for d, prompt in zip(batch, PROMPTS.values(), strict=True):
        one = router.route(prompt, policy=layer)
        assert (d.model, d.fallbacks, d.task) == (one.model, one.fallbacks, one.task)
        assert d.expected_cost_usd == pytest.approx(one.expected_cost_usd)


def test_request_constraints_change_the_choice(router, make_layer):
    layer = make_layer({"name": "utility", "lam": 0.0})
    base = router.route(CREATIVE, policy=layer)
    cap = 1e-4
    assert base.expected_cost_usd > cap  # unconstrained, it takes a hosted model
    cheap = router.route(CREATIVE, policy=layer, max_cost_usd=cap)
    assert cheap.model != base.model and cheap.expected_cost_usd <= cap
    assert base.expected_latency_s > 2.0
    fast = router.route(CREATIVE, policy=layer, latency_slo_s=2.0)
    assert fast.model != base.model and fast.expected_latency_s <= 2.0
    realtime = router.route(CREATIVE, policy=layer, slo="realtime")
    assert realtime.expected_ttft_s <= 0.2 and realtime.expected_latency_s <= 2.0
    stingy = router.route(CREATIVE, policy=layer, lam=1e9)
    assert stingy.expected_cost_usd == pytest.approx(
        min(router.route(CREATIVE, policy=layer, allowed_models=[m]).expected_cost_usd for m in router.models)
    )
    # a constraint applies to its own request only
    assert layer.policy.max_cost_usd is None and layer.policy.latency_slo_s is None
    assert router.route(CREATIVE, policy=layer).model == base.model


def test_bad_constraints_fail_with_clear_errors(router, make_layer):
    layer = make_layer({"name": "utility"})
    with pytest.raises(PolicyError, match=r"unknown constraint\(s\) \['deadline_s'\]"):
        router.route(CODE, policy=layer, deadline_s=1.0)
    with pytest.raises(PolicyError, match="unknown SLO preset 'warp'"):
        router.route(CODE, policy=layer, slo="warp")
    capability = make_layer({"name": "capability"})
    with pytest.raises(PolicyError, match="'capability' does not take the constraint 'max_cost_usd'"):
        router.route(CODE, policy=capability, max_cost_usd=0.01)
    with pytest.raises(RoutingError, match="need a policy"):
        router.route(CODE, max_cost_usd=0.01)
    unfitted = DecisionLayer(build_policy("utility"), layer.pool)
    with pytest.raises(PolicyError, match=r"not fitted: call DecisionLayer\.fit_router"):
        router.route(CODE, policy=unfitted)
    with pytest.raises(ValueError, match="unknown budget period 'fortnight'"):
        DecisionLayer(build_policy("utility"), layer.pool, period="fortnight")


def test_capability_layer_routes_by_task_with_max_tokens(router, make_layer):
    layer = make_layer({"name": "capability", "rules": "seed"})
    got = {task: router.route(prompt, policy=layer) for task, prompt in PROMPTS.items()}
    assert {t: (d.model, d.max_tokens) for t, d in got.items()} == {
        "classify": ("qwen2.5-1.5b-instruct", 100),
        "code": ("qwen2.5-coder-7b-instruct", 2000),
        "reason": ("qwen2.5-32b-instruct", 4000),
        "creative": ("claude-sonnet-4", 8000),
        "summarize": ("qwen2.5-7b-instruct", 500),
    }
    assert "(rule)" in got["code"].reason


def test_candidate_subsets_keep_the_fitted_tables_aligned(router, make_layer):
    layer = make_layer({"name": "capability", "rules": "seed"})
    # excluding another model must not shift the rule's column
    d = router.route(CODE, policy=layer, exclude_models=["claude-sonnet-4"])
    assert d.model == "qwen2.5-coder-7b-instruct" and "claude-sonnet-4" not in d.fallbacks
    # the rule's model excluded: the best predicted allowed model, and the reason says so
    allowed = ["gpt-4o", "qwen2.5-1.5b-instruct"]
    d = router.route(CODE, policy=layer, allowed_models=allowed)
    q = router.predict_quality(CODE).iloc[0][allowed]
    assert d.model == q.idxmax() and set(d.predicted_quality) == set(allowed)
    assert set(d.fallbacks) == set(allowed) - {d.model}
    assert "qwen2.5-coder-7b-instruct is not allowed here" in d.reason and d.max_tokens is None
    tiers = make_layer({"name": "budget_ratio", "budget_usd": 1.0})
    expensive = tiers.models_[tiers.policy.tiers_["expensive"]]
    others = [m for m in router.models if m != expensive]
    assert router.route(SUMMARY, policy=tiers).model == expensive
    assert router.route(SUMMARY, policy=tiers, allowed_models=others).model in others


def test_latency_aware_layer_avoids_a_model_measured_slow(router, make_layer):
    layer = make_layer({"name": "latency_aware", "slo": "realtime"})
    first = router.route(REASON, policy=layer)
    assert first.expected_ttft_s <= 0.2 and first.expected_latency_s <= 2.0
    for k in range(10):  # measured calls: 1.5 s to the first token
        layer.record(first, cost_usd=1e-5, request_id=f"slow-{k}", ttft_s=1.5)
    snap = layer.latency_model.snapshot().set_index("model")
    assert snap.loc[first.model, "source"] == "live" and snap.loc[first.model, "ttft_s"] > 1.0
    second = router.route(REASON, policy=layer)
    assert second.model != first.model
    assert second.expected_ttft_s <= 0.2 and "realtime" in second.reason
    assert router.route(REASON, policy=make_layer({"name": "latency_aware", "slo": "realtime"})).model == (
        first.model  # a fresh layer still has only the priors
    )


def test_record_writes_the_sqlite_ledger_once_per_request(router, make_layer, tmp_path):
    ledger = BudgetLedger(tmp_path / "spend.sqlite")
    layer = make_layer({"name": "utility"}, ledger=ledger, session="user-1")
    d = router.route(CODE, policy=layer)
    assert layer.record(d, cost_usd=0.01, request_id="req-1") is True
    assert layer.record(d, cost_usd=0.01, request_id="req-1") is False  # a retried report
    assert layer.record(d.model, cost_usd=0.002, request_id="req-2") is True
    assert layer.spent() == pytest.approx(0.012)
    rows = ledger.entries()
    assert rows["request_id"].tolist() == ["req-1", "req-2"]
    assert set(rows["model"]) == {d.model} and set(rows["session"]) == {"user-1"}
    with pytest.raises(PolicyError, match="unknown model 'gpt-9'"):
        layer.record("gpt-9", cost_usd=0.01)
    with pytest.raises(ValueError, match="cost_usd must be finite and >= 0"):
        layer.record(d, cost_usd=-1.0)
    ledger.close()


def test_budget_ratio_continues_at_the_right_tier_after_a_restart(router, make_layer, tmp_path):
    path = tmp_path / "ledger" / "spend.sqlite"

    def start(session: str = "user-1") -> DecisionLayer:
        cfg = {"name": "budget_ratio", "budget_usd": 1.0}
        return make_layer(cfg, ledger=BudgetLedger(path), session=session)

    layer = start()
    tier = {name: layer.models_[j] for name, j in layer.policy.tiers_.items()}
    assert len(set(tier.values())) == 3
    assert router.route(SUMMARY, policy=layer).model == tier["expensive"]
    d = router.route(SUMMARY, policy=layer)
    layer.record(d, cost_usd=0.6, request_id="a")
    assert router.route(SUMMARY, policy=layer).model == tier["medium"]
    layer.ledger.close()

    layer = start()  # a restart: a new process would open the same file
    assert layer.spent() == pytest.approx(0.6)
    assert router.route(SUMMARY, policy=layer).model == tier["medium"]
    layer.record(d, cost_usd=0.25, request_id="b")
    layer.record(d, cost_usd=0.25, request_id="b")  # counted once
    assert layer.spent() == pytest.approx(0.85)
    assert router.route(SUMMARY, policy=layer).model == tier["cheap"]
    layer.ledger.close()

    assert router.route(SUMMARY, policy=start()).model == tier["cheap"]
    assert router.route(SUMMARY, policy=start("user-2")).model == tier["expensive"]  # its own budget


def test_cost_aware_layer_refuses_once_the_cap_is_spent(router, make_layer, tmp_path):
    layer = make_layer({"name": "cost_aware", "budget_usd": 0.01, "horizon": 100})
    d = router.route(CODE, policy=layer)
    assert d.policy == "cost_aware" and d.expected_cost_usd <= 0.01
    layer.record(d, cost_usd=d.expected_cost_usd, request_id="big")  # billed as estimated
    assert layer.policy._seen == 1
    # spend booked elsewhere (another replica) brings the total to $0.0099; recording it through the
    # layer would teach the policy a bill/estimate ratio, and its cost bounds would grow with it
    layer.ledger.record(max(0.0, 0.0099 - d.expected_cost_usd), d.model, request_id="elsewhere")
    assert layer.spent() == pytest.approx(0.0099)
    d = router.route(CREATIVE, policy=layer)  # only a cheap model still fits under the cap
    assert d.expected_cost_usd <= 0.0001
    layer.record(d, cost_usd=0.0001, request_id="last")
    with pytest.raises(BudgetExhausted, match="hard cap"):
        router.route(CLASSIFY, policy=layer)
    # the operator's budget is a ceiling: a request asking for a larger one is refused all the same
    with pytest.raises(BudgetExhausted, match="hard cap"):
        router.route(CLASSIFY, policy=layer, budget_usd=1.0)
    with pytest.raises(BudgetExhausted, match="hard cap"):
        router.route(CLASSIFY, policy=layer, hard_cap_usd=1.0)
    assert layer.spent() == pytest.approx(0.01)
    # spend held by calls in flight counts as spent: a released hold frees the room again
    layer2 = make_layer({"name": "cost_aware", "budget_usd": 0.01, "horizon": 100})
    assert layer2.ledger.reserve("in-flight", 0.01, 0.01)
    assert layer2.spent() == pytest.approx(0.01)
    with pytest.raises(BudgetExhausted, match="hard cap"):
        router.route(CLASSIFY, policy=layer2)
    layer2.ledger.release("in-flight")
    assert router.route(CLASSIFY, policy=layer2).model in router.models


def _output_tokens_reference(model, models, tasks):
    """OutputLengthModel.predict as it was written before its per-task rows were cached."""
    import numpy as np

    uniq, inv = np.unique(np.asarray(tasks, dtype=str), return_inverse=True)
    ok = model.table_[model.table_["n"] >= model.min_count]
    pairs = dict(zip(zip(ok["model"], ok["task"], strict=True), ok["output_tokens"], strict=True))
    values = np.empty((len(uniq), len(models)))
    for i, task in enumerate(uniq):
        fallback = model._task_value(str(task))
        for j, m in enumerate(models):
            values[i, j] = pairs.get((m, task), fallback)
    return values[inv.reshape(-1)]


def test_output_length_rows_are_cached_without_changing_a_value():
    import numpy as np
    import pandas as pd

    from router_ml.decision.costs import OUTPUT_TOKEN_PRIOR, OutputLengthModel

    rng = np.random.default_rng(3)
    tasks_known = sorted(OUTPUT_TOKEN_PRIOR)
    table = pd.DataFrame(
        {
            "model": rng.choice(["a", "b", "c"], 600),
            "task": rng.choice(tasks_known[:3], 600),
            "output_tokens": rng.integers(1, 900, 600).astype(float),
        }
    )
    model = OutputLengthModel(min_count=40).fit(table)
    for _ in range(5):
        tasks = list(rng.choice(tasks_known, int(rng.integers(1, 9))))
        got = model.predict(["a", "c", "zz"], tasks)
        np.testing.assert_array_equal(got, _output_tokens_reference(model, ["a", "c", "zz"], tasks))
    model.min_count = 1000  # a new threshold: the cached rows are not reused
    np.testing.assert_array_equal(
        model.predict(["a"], tasks_known), _output_tokens_reference(model, ["a"], tasks_known)
    )
    model.fit(table.assign(output_tokens=table["output_tokens"] * 2))  # refitted: new rows
    model.min_count = 40
    np.testing.assert_array_equal(
        model.predict(["b"], tasks_known), _output_tokens_reference(model, ["b"], tasks_known)
    )
    assert model.predict(["a"], []).shape == (0, 1)


def test_one_prompt_decisions_equal_the_batch_decisions(router, make_layer):
    import numpy as np

    layer = make_layer({"name": "utility", "lam": 300.0})
    rng = np.random.default_rng(5)
    n, m = 6, len(layer.models_)
    quality = rng.uniform(size=(n, m))
    task_p = rng.dirichlet(np.ones(len(router.task_labels)), size=n)
    prompts = [f"prompt {i} " * int(rng.integers(1, 40)) for i in range(n)]
    batch = layer.decide(prompts, quality, layer.models_, task_p, router.task_labels)
    for i in range(n):
        (one,) = layer.decide(
            prompts[i : i + 1], quality[i : i + 1], layer.models_, task_p[i : i + 1], router.task_labels
        )
        assert one == batch[i]
    again = layer.decide(prompts, quality, layer.models_, task_p, router.task_labels)
    assert again == batch  # cached pool parts and output-length rows give the same answers


def test_when_nothing_meets_the_constraints_the_least_bad_model_is_taken_and_said(router, make_layer):
    layer = make_layer({"name": "utility"})
    cheap = router.route(CODE, policy=layer, max_cost_usd=1e-12)  # no model is that cheap
    costs = {m: router.route(CODE, policy=layer, allowed_models=[m]).expected_cost_usd for m in router.models}
    assert cheap.model == min(costs, key=costs.get)
    assert "no model meets the constraints" in cheap.reason
    fast = router.route(CODE, policy=layer, latency_slo_s=1e-6)  # nor that fast
    latency = {
        m: router.route(CODE, policy=layer, allowed_models=[m]).expected_latency_s for m in router.models
    }
    assert fast.model == min(latency, key=latency.get) and "least bad" in fast.reason
    top = max(cheap.predicted_quality.values())
    out_of_reach = router.route(CODE, policy=layer, target_quality=top + 0.01)  # beyond every model
    assert out_of_reach.model == max(out_of_reach.predicted_quality, key=out_of_reach.predicted_quality.get)
    assert "no usable model is predicted to reach quality" in out_of_reach.reason
    reachable = router.route(CODE, policy=layer, target_quality=0.0)  # every model reaches it: the cheapest
    assert reachable.model == min(costs, key=costs.get)


def test_models_allowed_per_task_bind_only_their_task(router, make_layer):
    allowed = {"code": router.models[:2], "reason": router.models[-1:]}
    layer = make_layer({"name": "utility", "lam": 10.0, "allowed_per_task": allowed})
    decisions = router.route_batch(list(PROMPTS.values()), policy=layer)
    assert [d.task for d in decisions] == list(PROMPTS)
    for d in decisions:
        if d.task in allowed:
            assert d.model in allowed[d.task]
            local = {m for m in router.models if layer.pool.is_local[layer.pool.index(m)]}
            assert set(d.fallbacks) - set(allowed[d.task]) <= local  # the last resort may be local
    free = make_layer({"name": "utility", "lam": 10.0})
    assert router.route(CREATIVE, policy=layer).model == router.route(CREATIVE, policy=free).model
    bad = make_layer({"name": "utility", "allowed_per_task": {"qa": ["no-such-model"]}})
    with pytest.raises(PolicyError, match="no-such-model"):
        router.route(CODE, policy=bad)
