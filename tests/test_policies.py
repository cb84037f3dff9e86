"""Routing policies on hand-built estimates: the seed's four strategies, the paced budget, the
baselines, fallback chains and building every ``router_ml/conf/policy`` file (fast: no encoder, no data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from router_ml.decision import (
    POLICIES,
    SLO_PRESETS,
    BudgetExhausted,
    Estimates,
    ModelPool,
    PolicyError,
    build_policy,
    replay,
)
from router_ml.decision.base import argmax_cheapest, fallback_order
from router_ml.decision.ledger import MemoryLedger
from router_ml.decision.policies import SEED_CAPABILITY
from router_ml.paths import POLICY_CONFIG_DIR

CONF_POLICY = POLICY_CONFIG_DIR
TASKS = ("classify", "summarize", "code", "reason", "creative", "qa")


def make_est(
    quality,
    cost,
    *,
    models: list[str] | None = None,
    tasks=None,
    ttft=None,
    latency=None,
    is_local=None,
    params_b=None,
    **extra,
) -> Estimates:
    """Estimates from (n, m) arrays (or (m,) rows); unset latencies are 0.1 s / 1 s everywhere."""
    q = np.atleast_2d(np.asarray(quality, dtype="float64"))
    n, m = q.shape

    def full(value, default):
        v = default if value is None else value
        return np.broadcast_to(np.asarray(v, dtype="float64"), (n, m)).copy()

    return Estimates(
        models=models or [f"m{j}" for j in range(m)],
        quality=q,
        tasks=np.array(["qa"] * n if tasks is None else list(tasks), dtype=object),
        cost=full(cost, 0.0),
        ttft=full(ttft, 0.1),
        latency=full(latency, 1.0),
        is_local=np.zeros(m, bool) if is_local is None else np.asarray(is_local, bool),
        params_b=None if params_b is None else np.asarray(params_b, dtype="float64"),
        **extra,
    )


def simulated_est(quality, tasks) -> Estimates:
    """Estimates over the simulator's pool: its prices, sizes, locality and latency priors
    (500 input and 100 output tokens per request)."""
    pool = ModelPool.simulated()
    cost = (500 * pool.input_price + 100 * pool.output_price) / 1e6
    ttft = np.array([s.ttft_s for s in pool])
    latency = ttft + 100 / np.array([s.tokens_per_s for s in pool])
    sizes = [s.params_b if s.params_b is not None else math.nan for s in pool]
    return make_est(
        quality,
        cost,
        models=pool.names,
        tasks=tasks,
        ttft=ttft,
        latency=latency,
        is_local=pool.is_local,
        params_b=sizes,
    )


# ------------------------------------------------------------------------------ estimates


def test_estimates_reject_mismatched_shapes():
    good = make_est([[0.5, 0.6]], 0.1)
    with pytest.raises(PolicyError, match=r"cost has shape \(1, 3\), expected \(1, 2\)"):
        Estimates(**{**vars(good), "cost": np.zeros((1, 3))})
    with pytest.raises(PolicyError, match="tasks has shape"):
        Estimates(**{**vars(good), "tasks": np.array(["qa", "qa"])})
    with pytest.raises(PolicyError, match="3 model names for 2 quality columns"):
        make_est([[0.5, 0.6]], 0.1, models=["a", "b", "c"])


def test_argmax_cheapest_breaks_ties_by_cost():
    score = np.array([[0.7, 0.9, 0.9], [0.1, 0.1, 0.1]])
    cost = np.array([[0.0, 2.0, 1.0], [3.0, 1.0, 2.0]])
    assert argmax_cheapest(score, cost).tolist() == [2, 1]


# ----------------------------------------------------------------------------- capability


def test_capability_seed_rules_follow_the_articles_table():
    pool = ModelPool.simulated()
    best = pool.names.index("gpt-4o")
    quality = np.full((len(TASKS), len(pool)), 0.5)
    quality[:, best] = 0.9  # the strongest model on average
    est = simulated_est(quality, TASKS)
    policy = build_policy({"name": "capability", "rules": "seed"}).fit(est)
    chosen = [est.models[j] for j in policy.choose(est)]
    assert dict(zip(TASKS, chosen, strict=True)) == {
        "classify": "qwen2.5-1.5b-instruct",
        "summarize": "qwen2.5-7b-instruct",
        "code": "qwen2.5-coder-7b-instruct",
        "reason": "qwen2.5-32b-instruct",
        "creative": "claude-sonnet-4",
        "qa": "gpt-4o",  # no rule in the article: the strongest model
    }
    assert policy.max_tokens_ == {t: SEED_CAPABILITY[t]["max_tokens"] for t in TASKS[:5]}
    assert policy.max_tokens_["classify"] == 100 and policy.max_tokens_["creative"] == 8000
    qa = est.take([5])
    assert "no rule" in policy.explain(qa, best) and "strongest model gpt-4o" in policy.explain(qa, best)
    assert "(rule)" in policy.explain(est.take([2]), int(policy.choose(est)[2]))


def test_capability_auto_resolves_the_size_tiers_against_the_pool():
    models = ["m-2b", "m-8b", "m-coder-8b", "m-14b", "m-30b", "m-70b", "api-x"]
    sizes = [2, 8, 8, 14, 30, 70, math.nan]  # the API's size is unknown: it counts as the largest
    q = {
        "classify": [0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],  # 1-3B: the only model in range
        "summarize": [0.9, 0.5, 0.6, 0.9, 0.9, 0.9, 0.9],  # 3-7B: none; nearest size is 8B
        "code": [0.1, 0.2, 0.3, 0.9, 0.9, 0.9, 0.9],  # 7-14B: the coder model is preferred
        "reason": [0.1, 0.2, 0.2, 0.8, 0.6, 0.9, 0.9],  # 14-32B: best predicted in range
        "creative": [0.1, 0.2, 0.2, 0.3, 0.9, 0.5, 0.7],  # 32B+: best of 70B and the API
        "qa": [0.1, 0.2, 0.2, 0.3, 0.4, 0.5, 0.95],  # no tier: strongest overall
    }
    est = make_est(np.array(list(q.values())), 0.01, models=models, tasks=list(q), params_b=sizes)
    policy = build_policy({"name": "capability", "rules": "auto"}).fit(est)
    chosen = dict(zip(q, (models[j] for j in policy.choose(est)), strict=True))
    assert chosen == {
        "classify": "m-2b",
        "summarize": "m-8b",  # nearest to the 3-7B tier on a log scale (8B beats 2B), first on ties
        "code": "m-coder-8b",  # though m-14b is predicted better: the seed prefers coder models
        "reason": "m-14b",  # 30B is in range too but predicted worse on reason prompts
        "creative": "api-x",
        "qa": "api-x",
    }
    assert policy.max_tokens_["code"] == 2000


def test_capability_rules_naming_an_unknown_model_fail_with_its_name():
    est = simulated_est(np.full((2, 7), 0.5), ["code", "qa"])
    rules = {"code": {"model": "gpt-5-codex", "max_tokens": 1000}, "qa": {"model": "gpt-4o"}}
    with pytest.raises(PolicyError, match=r"'gpt-5-codex'.*not in the pool"):
        build_policy({"name": "capability", "rules": rules}).fit(est)
    lax = build_policy({"name": "capability", "rules": rules, "strict": False}).fit(est)
    assert "code" not in lax.table_ and lax.max_tokens_ == {"qa": None}
    assert [est.models[j] for j in lax.choose(est)][1] == "gpt-4o"
    with pytest.raises(PolicyError, match="'summarize' has no 'model'"):
        build_policy({"name": "capability", "rules": {"summarize": {"max_tokens": 5}}}).fit(est)
    with pytest.raises(PolicyError, match="mapping, 'auto' or 'seed'"):
        build_policy({"name": "capability", "rules": "biggest"}).fit(est)
    with pytest.raises(PolicyError, match="not fitted"):
        build_policy("capability").choose(est)


def test_capability_seed_rules_need_the_seed_models():
    est = make_est([[0.5, 0.6]], 0.01, models=["qwen2.5-1.5b-instruct", "gpt-4o"], tasks=["classify"])
    with pytest.raises(PolicyError, match=r"qwen2\.5-7b-instruct"):
        build_policy({"name": "capability", "rules": "seed"}).fit(est)


# -------------------------------------------------------------------------------- utility

# three models: cheap and weak, mid, expensive and best (on the first row)
Q3 = np.array([[0.50, 0.70, 0.90], [0.60, 0.65, 0.66]])
C3 = np.array([[0.001, 0.01, 0.1], [0.001, 0.01, 0.1]])


def test_utility_lam_trades_quality_for_cost():
    est = make_est(Q3, C3)
    assert build_policy({"name": "utility", "lam": 0}).fit(est).choose(est).tolist() == [2, 2]
    assert build_policy({"name": "utility", "lam": 1e6}).choose(est).tolist() == [0, 0]
    # lam = 3: row 0 scores 0.497, 0.67, 0.6 -> mid; row 1 scores 0.597, 0.62, 0.36 -> mid
    assert build_policy({"name": "utility", "lam": 3.0}).choose(est).tolist() == [1, 1]
    rng = np.random.default_rng(0)
    q, c = rng.random((200, 5)), rng.random((200, 5)) * 0.01
    est = make_est(q, c)
    for lam in (0.0, 10.0, 100.0):
        got = build_policy({"name": "utility", "lam": lam}).choose(est)
        np.testing.assert_array_equal(got, np.argmax(q - lam * c, axis=1))


def test_utility_target_quality_takes_the_cheapest_model_that_reaches_it():
    est = make_est(Q3, C3)
    policy = build_policy({"name": "utility", "target_quality": 0.65})
    assert policy.choose(est).tolist() == [1, 1]
    assert policy.with_knob(0.0).target_quality == 0.65  # the knob is lam
    # row 1 reaches 0.8 nowhere: its best predicted model, and the reason says so
    high = build_policy({"name": "utility", "target_quality": 0.8})
    assert high.choose(est).tolist() == [2, 2]
    assert "no usable model is predicted to reach quality 0.80" in high.explain(est.take([1]), 2)
    assert "cheapest model predicted to reach" in high.explain(est.take([0]), 2)
    reason = policy.explain(est.take([0]), 1)
    assert "cheapest model predicted to reach quality 0.65" in reason and "m1" in reason


def test_utility_hard_constraints_exclude_models():
    latency = np.array([[0.5, 1.0, 6.0], [0.5, 1.0, 6.0]])
    ttft = np.array([[0.05, 0.4, 0.3], [0.05, 0.4, 0.3]])
    est = make_est(Q3, C3, ttft=ttft, latency=latency, tasks=["code", "qa"])
    pick = lambda **kw: build_policy({"name": "utility", **kw}).choose(est).tolist()  # noqa: E731
    assert pick() == [2, 2]
    assert pick(latency_slo_s=5.0) == [1, 1]
    assert pick(ttft_slo_s=0.35) == [2, 2] and pick(ttft_slo_s=0.2) == [0, 0]
    assert pick(slo="interactive") == [1, 1]  # 0.5 s first token, 5 s completion
    assert pick(slo="interactive", latency_slo_s=10.0) == [2, 2]  # explicit beats the preset
    assert pick(max_cost_usd=0.05) == [1, 1]
    assert pick(allowed_per_task={"code": ["m0", "m1"]}) == [1, 2]  # only code rows are limited
    usable = build_policy({"name": "utility", "max_cost_usd": 0.005}).usable(est)
    assert usable.tolist() == [[True, False, False]] * 2
    with pytest.raises(PolicyError, match=r"unknown model.*'m9'"):
        pick(allowed_per_task={"code": ["m9"]})


def test_utility_with_nothing_feasible_takes_the_fastest_or_cheapest_and_says_so():
    latency = np.array([[3.0, 2.0, 9.0]])
    est = make_est(Q3[:1], C3[:1] + np.array([[0.02, 0.0, 0.0]]), latency=latency)  # m1 is now the cheapest
    slow = build_policy({"name": "utility", "latency_slo_s": 1.0})
    (j,) = slow.choose(est)
    assert j == 1  # the fastest
    assert "no model meets the constraints" in slow.explain(est, int(j))
    poor = build_policy({"name": "utility", "max_cost_usd": 1e-6})
    (j,) = poor.choose(est)
    assert j == 1  # the cheapest
    assert "no model meets the constraints" in poor.explain(est, int(j))
    ok = build_policy({"name": "utility", "lam": 0.0})
    assert "no model meets" not in ok.explain(est, 2) and "m2" in ok.explain(est, 2)


def test_utility_rejects_bad_settings():
    with pytest.raises(PolicyError, match="lam must be >= 0"):
        build_policy({"name": "utility", "lam": -1})
    with pytest.raises(PolicyError, match="unknown SLO preset 'instant'"):
        build_policy({"name": "utility", "slo": "instant"})


# -------------------------------------------------------------------------- latency_aware


def test_latency_presets_follow_the_article():
    assert SLO_PRESETS["realtime"] == (0.2, 2.0, 7.0)
    assert SLO_PRESETS["interactive"] == (0.5, 5.0, 14.0)
    assert SLO_PRESETS["batch"][:2] == (1.0, 30.0) and SLO_PRESETS["research"][:2] == (2.0, 60.0)


def test_latency_aware_realtime_excludes_slow_and_large_models():
    pool = ModelPool.simulated()
    # everyone equally good except the API flagship, then the 32B model, then the 1.5B
    quality = np.array([[0.6, 0.5, 0.5, 0.8, 0.5, 0.9, 0.5]])
    est = simulated_est(quality, ["qa"])

    def names(slo: str) -> str:
        return est.models[int(build_policy({"name": "latency_aware", "slo": slo}).choose(est)[0])]

    assert names("batch") == "gpt-4o" and names("research") == "gpt-4o"
    assert names("realtime") == "qwen2.5-1.5b-instruct"  # gpt-4o: 0.3 s first token; 32B: too big
    realtime = build_policy({"name": "latency_aware", "slo": "realtime"})
    usable = dict(zip(pool.names, realtime.usable(est)[0], strict=True))
    assert not usable["qwen2.5-32b-instruct"] and not usable["gpt-4o"] and not usable["claude-sonnet-4"]
    assert usable["gpt-4o-mini"]  # 0.2 s first token, size unknown: its latency decides
    # interactive (0.5 s, 5 s, < 14B): gpt-4o fits (0.3 s, 1.55 s); the 32B model is in time
    # (0.5 s, 4.5 s) but too big
    assert names("interactive") == "gpt-4o"
    interactive = build_policy({"name": "latency_aware", "slo": "interactive"})
    assert not interactive.usable(est)[0, 3] and interactive.usable(est)[0, 5]
    # made fast, the 32B model is still too big for realtime unless the size limit is raised
    fast = simulated_est(quality, ["qa"])
    fast.ttft[:, 3], fast.latency[:, 3] = 0.05, 0.5
    assert not realtime.usable(fast)[0, 3]
    sized = build_policy({"name": "latency_aware", "slo": "realtime", "max_params_b": 40})
    assert fast.models[int(sized.choose(fast)[0])] == "qwen2.5-32b-instruct"


def test_latency_aware_explicit_slo_and_nothing_fast_enough():
    est = make_est(Q3[:1], C3[:1], ttft=[[0.3, 0.6, 0.9]], latency=[[4.0, 3.0, 8.0]])
    custom = build_policy({"name": "latency_aware", "slo": None, "latency_slo_s": 5.0})
    assert custom.choose(est).tolist() == [1]
    reason = custom.explain(est, 1)
    assert "latency_aware[custom]" in reason and "total<=5.0s: m1" in reason and "None" not in reason
    assert "size<=7B" in build_policy({"name": "latency_aware", "slo": "realtime"}).explain(est, 1)
    hopeless = build_policy({"name": "latency_aware", "slo": "realtime"})
    (j,) = hopeless.choose(est)
    assert j == 1  # the fastest expected completion
    assert "no model meets" in hopeless.explain(est, int(j)) and "fastest is m1" in hopeless.explain(
        est, int(j)
    )
    with pytest.raises(PolicyError, match="unknown SLO preset 'asap'"):
        build_policy({"name": "latency_aware", "slo": "asap"})


# --------------------------------------------------------------------------- budget_ratio


def test_budget_ratio_replay_falls_back_as_the_budget_is_spent():
    n = 60
    q = np.tile([0.4, 0.6, 0.7, 0.9], (n, 1))  # cheap, (pricier but worse), medium, expensive
    c = np.tile([0.001, 0.01, 0.02, 0.05], (n, 1))
    est = make_est(q, c, models=["cheap", "dud", "mid", "best"])
    policy = build_policy({"name": "budget_ratio", "budget_usd": 1.0}).fit(est)
    assert {k: est.models[v] for k, v in policy.tiers_.items()} == {
        "expensive": "best",
        "medium": "mid",  # the best predicted among models priced in between
        "cheap": "cheap",
    }
    ledger = MemoryLedger()
    choice, refused = replay(policy, est, c, ledger=ledger)
    assert not refused.any()
    spent_before = np.concatenate([[0.0], np.cumsum(c[np.arange(n), choice])[:-1]])
    expected = np.where(spent_before < 0.5, 3, np.where(spent_before < 0.8, 2, 0))
    np.testing.assert_array_equal(choice, expected)
    assert [est.models[j] for j in dict.fromkeys(choice)] == ["best", "mid", "cheap"]
    assert ledger.count() == n and ledger.spent() == pytest.approx(c[np.arange(n), choice].sum())
    assert policy.tier(0.49) == "expensive" and policy.tier(0.5) == "medium"
    assert policy.tier(0.8) == "cheap" and policy.tier(5.0) == "cheap"  # no refusal: the seed's


def test_budget_ratio_explicit_tiers_and_errors():
    est = make_est([[0.4, 0.6, 0.9]], [[0.001, 0.01, 0.05]], models=["a", "b", "c"])
    tiers = {"expensive": "b", "medium": "c", "cheap": "a"}
    policy = build_policy({"name": "budget_ratio", "budget_usd": 2.0, "tiers": tiers}).fit(est)
    assert [policy.step(est, s) for s in (0.0, 1.2, 1.7)] == [1, 2, 0]
    assert "$2 session budget" in policy.explain(est, 1)
    with pytest.raises(PolicyError, match="tier 'medium' names model 'zzz'"):
        build_policy({"name": "budget_ratio", "tiers": {**tiers, "medium": "zzz"}}).fit(est)
    with pytest.raises(PolicyError, match="not fitted"):
        build_policy("budget_ratio").step(est, 0.0)
    with pytest.raises(PolicyError, match="budget_usd must be > 0"):
        build_policy({"name": "budget_ratio", "budget_usd": 0})


# ----------------------------------------------------------------------------- cost_aware


@pytest.fixture(scope="module")
def traffic() -> Estimates:
    """3,000 requests over four models whose quality and price both rise (with noise)."""
    rng = np.random.default_rng(0)
    n = 3000
    q = np.clip([0.4, 0.55, 0.7, 0.8] + 0.15 * rng.standard_normal((n, 4)), 0, 1)
    c = np.array([1e-5, 1e-4, 1e-3, 5e-3]) * np.exp(0.3 * rng.standard_normal((n, 4)))
    return make_est(q, c, models=["small", "medium", "large", "api"], is_local=[1, 1, 1, 0])


def _spend(est: Estimates, bills: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """(n,) running spend after each request (refused requests, choice -1, cost nothing)."""
    rows = np.arange(len(est))
    paid = np.where(choice >= 0, bills[rows, np.maximum(choice, 0)], 0.0)
    return np.cumsum(paid)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.8])
def test_cost_aware_spends_the_budget_without_crossing_the_cap(traffic, fraction):
    est, n = traffic, len(traffic)
    best = est.cost[np.arange(n), est.quality.argmax(1)].sum()  # always the best predicted model
    budget = fraction * best
    assert est.cost[:, 0].sum() < budget  # the budget is feasible
    policy = build_policy({"name": "cost_aware", "budget_usd": budget, "horizon": n}).fit(est)
    choice, refused = replay(policy, est, est.cost)
    spend = _spend(est, est.cost, choice)
    assert not refused.any()
    assert spend.max() <= budget * (1 + 1e-9)  # the hard cap (default: the budget)
    assert spend[-1] == pytest.approx(budget, rel=0.05)
    assert spend[n // 2 - 1] == pytest.approx(budget / 2, rel=0.15)  # paced, not front-loaded


def test_cost_aware_quality_rises_with_the_budget(traffic):
    est, n = traffic, len(traffic)
    rows, mean_q = np.arange(n), []
    for budget in (0.5, 2.0, 8.0):
        policy = build_policy({"name": "cost_aware", "budget_usd": budget, "horizon": n}).fit(est)
        choice, _ = replay(policy, est, est.cost)
        mean_q.append(est.quality[rows, choice].mean())
    assert mean_q[0] < mean_q[1] < mean_q[2]


def test_cost_aware_hard_cap_below_the_budget_refuses_the_rest(traffic):
    est = traffic.take(slice(0, 500))
    policy = build_policy({"name": "cost_aware", "budget_usd": 5.0, "horizon": 500, "hard_cap_usd": 0.2}).fit(
        est
    )
    choice, refused = replay(policy, est, est.cost)
    spend = _spend(est, est.cost, choice)
    assert spend.max() <= 0.2 + 1e-12
    assert refused.any() and (choice[refused] == -1).all()
    assert spend[-1] > 0.2 - est.cost.max()  # it used what it was allowed to


def test_cost_aware_refuses_when_nothing_fits():
    est = make_est([[0.5, 0.9]], [[0.01, 0.05]])
    policy = build_policy({"name": "cost_aware", "budget_usd": 0.005, "horizon": 10}).fit(est)
    with pytest.raises(BudgetExhausted, match="no model fits"):
        policy.step(est, 0.0)
    # bound_factor 1: the expected bill is taken as exact (the default 2.0 keeps a safety margin)
    policy = build_policy({"name": "cost_aware", "budget_usd": 0.1, "horizon": 10, "bound_factor": 1.0}).fit(
        est
    )
    assert policy.step(est, 0.0) in (0, 1)
    with pytest.raises(BudgetExhausted, match=r"\$0.095000 of the \$0.100000 hard cap"):
        policy.step(est, 0.095)
    choice, refused = replay(policy, make_est(np.tile([0.5, 0.9], (30, 1)), 0.01), np.full((30, 2), 0.01))
    assert refused.sum() == 20 and (choice[:10] >= 0).all()  # ten calls fit under $0.10
    safe = build_policy({"name": "cost_aware", "budget_usd": 0.1, "horizon": 10}).fit(est)
    choice, refused = replay(safe, make_est(np.tile([0.5, 0.9], (30, 1)), 0.01), np.full((30, 2), 0.01))
    assert refused.sum() == 21  # a 2x margin on unbounded bills leaves the last $0.01 unspent


def test_cost_aware_hard_cap_holds_when_bills_exceed_the_estimates():
    # bills run 1.8x the estimates: within the default 2x margin, so the cap is never crossed
    est = make_est(np.tile([0.5, 0.9], (200, 1)), 0.01)
    policy = build_policy({"name": "cost_aware", "budget_usd": 1.0, "horizon": 200}).fit(est)
    bills = np.full((200, 2), 0.018)
    choice, refused = replay(policy, est, bills)
    spend = np.cumsum(np.where(choice >= 0, 0.018, 0.0))
    assert spend.max() <= 1.0 + 1e-12 and refused.any()
    with pytest.raises(PolicyError, match="not fitted"):
        build_policy("cost_aware").lam_for_rate(0.1)
    with pytest.raises(PolicyError, match="must be > 0"):
        build_policy({"name": "cost_aware", "horizon": 0})


def test_cost_aware_learns_that_bills_run_twice_the_estimates(traffic):
    est, n = traffic, len(traffic)
    budget, bills = 1.0, 2.0 * traffic.cost
    learning = build_policy({"name": "cost_aware", "budget_usd": budget, "horizon": n}).fit(est)
    choice, refused = replay(learning, est, bills)
    spend = _spend(est, bills, choice)
    assert learning._ratio == pytest.approx(2.0, rel=0.01)
    assert spend[-1] == pytest.approx(budget, rel=0.05)
    assert spend[n // 2 - 1] == pytest.approx(budget / 2, rel=0.15)  # still paced
    assert refused.mean() < 0.01
    # without the learned ratio only the spend so far corrects it: it front-loads the budget,
    # then starves (more refusals at the end, lower quality overall)
    blind = build_policy({"name": "cost_aware", "budget_usd": budget, "horizon": n, "eta": 0.0}).fit(est)
    blind_choice, blind_refused = replay(blind, est, bills)
    assert _spend(est, bills, blind_choice)[n // 2 - 1] > 0.65 * budget
    assert blind_refused.sum() > 3 * max(refused.sum(), 1)
    rows = np.arange(n)
    assert est.quality[rows, choice].mean() > est.quality[rows, blind_choice].mean()


# ------------------------------------------------------------------------------ baselines


def test_threshold_routes_to_the_strong_model_above_the_threshold():
    q = np.array([[0.5, 0.9, 0.6], [0.5, 0.55, 0.6], [0.2, 0.4, 0.1]])
    est = make_est(q, [[0.001, 0.05, 0.01]] * 3)
    policy = build_policy({"name": "threshold", "threshold": 0.1}).fit(est)
    assert policy.pair_ == (1, 0)  # strongest on average, cheapest
    np.testing.assert_allclose(policy.advantage(est), [0.4, 0.05, 0.2])
    assert policy.choose(est).tolist() == [1, 0, 1]
    assert policy.with_knob(1.0).choose(est).tolist() == [0, 0, 0]
    assert policy.threshold == 0.1  # with_knob copies
    named = build_policy({"name": "threshold", "strong": "m2", "weak": "m0", "threshold": 0.05}).fit(est)
    assert named.choose(est).tolist() == [2, 2, 0]
    assert "+0.100" in named.explain(est.take([0]), 2)
    with pytest.raises(PolicyError, match="'gpt-9' is not in the pool"):
        build_policy({"name": "threshold", "strong": "gpt-9"}).fit(est)
    with pytest.raises(PolicyError, match="strong and weak models are the same"):
        build_policy({"name": "threshold", "strong": "m0", "weak": "m0"}).fit(est)


def test_random_mixes_strong_and_weak_reproducibly():
    est = make_est(np.tile([0.5, 0.9, 0.6], (2000, 1)), [0.001, 0.05, 0.01])
    for p, share in ((0.0, 0.0), (1.0, 1.0)):
        assert (build_policy({"name": "random", "p_strong": p}).fit(est).choose(est) == 1).mean() == share
    policy = build_policy({"name": "random", "p_strong": 0.3, "seed": 7}).fit(est)
    first = policy.choose(est)
    assert set(first.tolist()) == {0, 1} and abs((first == 1).mean() - 0.3) < 0.04
    np.testing.assert_array_equal(policy.fit(est).choose(est), first)  # fit re-seeds
    feasible = np.ones((2000, 3), bool)
    feasible[:, 1] = False
    uniform = build_policy({"name": "random", "uniform": True}).fit(est)
    picks = uniform.choose(make_est(est.quality, est.cost, feasible=feasible))
    assert set(picks.tolist()) == {0, 2}
    with pytest.raises(PolicyError, match=r"p_strong must be in \[0, 1\]"):
        build_policy({"name": "random", "p_strong": 1.5})


def test_zero_router_mixes_neighbours_on_the_cost_quality_hull():
    # m1 is dominated (pricier and worse than m2): never on the hull
    q, c = [0.4, 0.5, 0.7, 0.9], [0.001, 0.03, 0.01, 0.05]
    est = make_est(np.tile(q, (4000, 1)), c)
    hull = [j for j, _, _ in build_policy("zero").fit(est).hull_]
    assert hull == [0, 2, 3]
    assert set(build_policy({"name": "zero", "position": 0.0}).fit(est).choose(est).tolist()) == {0}
    assert set(build_policy({"name": "zero", "position": 1.0}).fit(est).choose(est).tolist()) == {3}
    mid = build_policy({"name": "zero", "position": 0.5}).fit(est).choose(est)
    assert set(mid.tolist()) == {2, 3}  # target cost 0.0255 lies between m2 and m3
    assert np.mean(np.array(c)[mid]) == pytest.approx(0.0255, rel=0.05)
    # with true scores it is fitted on them, not on the predictions
    observed = np.tile([0.4, 0.95, 0.7, 0.9], (4000, 1))
    truth = make_est(est.quality, est.cost, observed=observed)
    assert [j for j, _, _ in build_policy("zero").fit(truth).hull_] == [0, 2, 1]


def test_oracle_takes_the_cheapest_of_the_best_true_scores():
    observed = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [np.nan, 0.0, 0.5]])
    cost = np.array([[0.05, 0.01, 0.001]] * 3)
    est = make_est(np.full((3, 3), 0.5), cost, observed=observed)
    assert build_policy("oracle").fit(est).choose(est).tolist() == [1, 2, 2]
    with pytest.raises(PolicyError, match="no observed scores"):
        build_policy("oracle").choose(make_est(np.full((3, 3), 0.5), cost))
    with pytest.raises(PolicyError, match="'oracle' has no knob"):
        build_policy("oracle").with_knob(1)


# ------------------------------------------------------------------------------ fallbacks


def test_fallback_order_best_to_most_reliable_local_last():
    #            api-a api-b loc-c loc-d loc-e
    quality = np.array([0.9, 0.7, 0.8, 0.6, 0.5])
    is_local = np.array([0, 0, 1, 1, 1], bool)
    usable = np.ones(5, bool)
    assert fallback_order(quality, is_local, 0, usable, max_len=3) == [1, 2, 3]
    assert fallback_order(quality, is_local, 2, usable, max_len=4) == [0, 1, 3, 4]
    for chosen in range(5):
        for max_len in (1, 2, 3, 4):
            chain = fallback_order(quality, is_local, chosen, usable, max_len=max_len)
            assert chosen not in chain and len(chain) == len(set(chain)) <= max_len
            assert is_local[chain[-1]]  # the last resort does not need the network
    # the chain is cut before any local model: the best local one takes the last place
    assert fallback_order(quality, is_local, 4, usable, max_len=2) == [0, 2]
    assert fallback_order(quality, is_local, 0, usable, max_len=1) == [2]
    # unusable models are left out; a pool without a local model ends with an API one
    assert fallback_order(quality, is_local, 0, np.array([1, 0, 1, 0, 1], bool), 3) == [2, 4]
    assert fallback_order(quality[:2], is_local[:2], 0, np.ones(2, bool), 3) == [1]


# --------------------------------------------------------------------------- build_policy


@pytest.mark.parametrize("path", sorted(CONF_POLICY.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_policy_config_builds(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    policy = build_policy(cfg)
    assert policy.name == path.stem == cfg["name"]
    params = policy.params()
    for key, value in cfg.items():
        if key not in ("name", "sweep", "heads"):
            assert key in params, f"{path.name}: {key!r} is not a parameter of {type(policy).__name__}"
            expected = tuple(value) if isinstance(value, list) else value
            assert params[key] in (value, expected) or (value is None and not params[key])
    if policy.knob is not None:
        assert policy.knob in params


def test_every_policy_has_a_config_file():
    assert {p.stem for p in CONF_POLICY.glob("*.yaml")} == set(POLICIES)


def test_build_policy_errors_name_the_problem():
    with pytest.raises(PolicyError, match=r"unknown policy 'cheapest'; known: .*'utility'"):
        build_policy({"name": "cheapest"})
    with pytest.raises(PolicyError, match=r"unknown policy None"):
        build_policy({"lam": 1.0})
    with pytest.raises(PolicyError, match=r"policy 'utility': bad parameters.*'lambda'"):
        build_policy({"name": "utility", "lambda": 1.0})
    assert build_policy("utility").lam == 0.0


# ------------------------------------------------------------------- the operator's ceiling
def _request(cfg: dict, **constraints):
    """The policy one request with ``constraints`` is decided by (the decision layer applies them)."""
    from router_ml.decision import DecisionLayer

    return DecisionLayer(build_policy(cfg), ModelPool.simulated())._policy_for(constraints)


def test_a_request_cannot_lift_a_cost_aware_budget_or_cap() -> None:
    cfg = {"name": "cost_aware", "budget_usd": 1.0}
    lifted = _request(cfg, budget_usd=1e6)  # model="router:cost_aware:1e6"
    assert lifted.budget_usd == 1.0 and lifted.cap == 1.0 and lifted.spend_cap() == 1.0
    assert _request(cfg, hard_cap_usd=50.0).cap == 1.0
    tighter = _request(cfg, budget_usd=0.25)
    assert tighter.budget_usd == 0.25 and tighter.cap == 0.25  # the cap follows a lower budget
    capped = _request({**cfg, "hard_cap_usd": 2.0}, budget_usd=5.0, hard_cap_usd=1.5)
    assert capped.budget_usd == 1.0 and capped.cap == 1.5
    # the lifted policy refuses what the operator's refuses: spent 0.9 + bound 0.2 > 1
    est = make_est([[0.5, 0.9]], [0.01, 0.2], cost_upper=np.array([[0.01, 0.2]]))
    assert lifted.usable(est, spent=0.9).tolist() == [[True, False]]
    with pytest.raises(PolicyError, match="'budget_usd' must be a number >= 0"):
        _request(cfg, budget_usd="lots")
    with pytest.raises(PolicyError, match="'budget_usd' must be a number >= 0"):
        _request(cfg, budget_usd=math.nan)


def test_a_request_cannot_lift_a_budget_ratio_budget() -> None:
    cfg = {"name": "budget_ratio", "budget_usd": 2.0}
    assert _request(cfg, budget_usd=100.0).budget_usd == 2.0
    assert _request(cfg, budget_usd=0.5).budget_usd == 0.5


def test_a_request_cannot_loosen_utility_limits_but_may_trade_inside_them() -> None:
    cfg = {"name": "utility", "lam": 5.0, "max_cost_usd": 0.01, "ttft_slo_s": 0.5, "latency_slo_s": 5.0}
    p = _request(cfg, max_cost_usd=1.0, ttft_slo_s=9.0, latency_slo_s=60.0)
    assert (p.max_cost_usd, *p.limits()) == (0.01, 0.5, 5.0)
    p = _request(cfg, max_cost_usd=0.001, ttft_slo_s=0.2)
    assert (p.max_cost_usd, *p.limits()) == (0.001, 0.2, 5.0)
    # an slo preset looser than the operator's explicit SLO keeps the operator's; a tighter one wins
    assert _request(cfg, slo="research").limits() == (0.5, 5.0)
    assert _request(cfg, slo="realtime").limits() == (0.2, 2.0)
    # an operator preset is a ceiling too, against explicit values and looser presets
    preset = {"name": "utility", "slo": "interactive"}
    assert _request(preset, ttft_slo_s=30.0, latency_slo_s=300.0).limits() == (0.5, 5.0)
    assert _request(preset, slo="batch").limits() == (0.5, 5.0)
    # an operator without a limit lets the request set one
    assert _request({"name": "utility"}, max_cost_usd=0.02).max_cost_usd == 0.02
    # preferences are free: lam and target_quality go either way
    assert _request(cfg, lam=0.0).lam == 0.0 and _request(cfg, lam=1e9).lam == 1e9
    assert _request(cfg, target_quality=0.9).target_quality == 0.9
    est = make_est([[0.9, 0.5]], [0.5, 0.001])
    assert _request(cfg, max_cost_usd=10.0, lam=0.0).choose(est).tolist() == [1]  # 0.5 > the $0.01 cap


def test_a_request_cannot_loosen_latency_aware_slo() -> None:
    cfg = {"name": "latency_aware", "slo": "realtime"}  # 0.2 s, 2 s, 7B
    p = _request(cfg, slo="research")  # model="router:latency_aware:research"
    assert p.limits() == (0.2, 2.0, 7.0)
    p = _request({"name": "latency_aware", "slo": "research"}, slo="realtime")
    assert p.limits() == (0.2, 2.0, 7.0)
    explicit = {"name": "latency_aware", "slo": None, "ttft_slo_s": 1.0, "latency_slo_s": 10.0}
    assert _request(explicit, slo="research").limits()[:2] == (1.0, 10.0)
    assert _request(explicit, ttft_slo_s=0.3).limits()[:2] == (0.3, 10.0)
    est = make_est([[0.9, 0.6]], [0.0, 0.0], ttft=[[1.0, 0.1]], latency=[[3.0, 1.0]])
    assert _request(cfg, slo="research").choose(est).tolist() == [1]


def test_a_threshold_is_a_free_preference() -> None:
    cfg = {"name": "threshold", "threshold": 0.1}
    assert _request(cfg, threshold=-1.0).threshold == -1.0 and _request(cfg, threshold=5.0).threshold == 5.0
    with pytest.raises(PolicyError, match="does not take the constraint 'budget_usd'"):
        _request(cfg, budget_usd=1.0)
