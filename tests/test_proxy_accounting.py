"""The proxy's own account of what happened: ``/health`` when a local server dies, ``/metrics`` and
the ledger for a stream that fails part-way, the ledger's decided model and serving backend, and the
address ``serve`` prints. Real loopback servers (tests/fakes/loopback) behind the real app."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from router_ml.backends.catalog import Catalog
from router_ml.router import LearnedRouter
from router_ml.serving.proxy import ProxySettings, create_app
from tests.fakes.loopback import LoopbackThread
from tests.test_proxy import Served, _engine

openai = pytest.importorskip("openai")

MSG = [{"role": "user", "content": "Classify the sentiment: 'I love it'"}]


@pytest.fixture(scope="module")
def router(trained_run):
    return LearnedRouter.from_pretrained(trained_run / "checkpoint")


def _catalog(fast: LoopbackThread, big: LoopbackThread, spare: LoopbackThread | None = None) -> Catalog:
    local = {"kind": "vllm", "prices": {"input_per_mtok": 0.1, "output_per_mtok": 0.2},
             "latency": {"ttft_s": 0.05, "tokens_per_s": 100}, "first_token_timeout_s": 1, "tokenizer": "approx"}  # fmt: skip
    entries = [
        {"name": "fast", "base_url": fast.base_url, **local},
        {"name": "big", "kind": "api", "base_url": big.base_url, "tokenizer": "approx",
         "prices": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}, "latency": {"ttft_s": 0.3, "tokens_per_s": 50},
         "first_token_timeout_s": 1},
    ]  # fmt: skip
    if spare is not None:
        entries.append({"name": "spare", "base_url": spare.base_url, **local})
    return Catalog.from_entries({"backends": entries})


def _wait(check, timeout: float = 15.0):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got or time.time() > deadline:
            return got
        time.sleep(0.1)


def _requests_total(url: str, route: str, status: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if (
            line.startswith("router_ml_requests_total{")
            and f'route="{route}"' in line
            and f'status="{status}"' in line
        ):
            return float(line.split()[-1])
    return 0.0


def test_health_marks_a_dead_local_server_and_drops_its_stale_metrics(router):
    fast, big, spare = LoopbackThread().start(), LoopbackThread().start(), LoopbackThread().start()
    try:
        engine = _engine(router, _catalog(fast, big, spare))
        with Served(create_app(engine, ProxySettings(metrics_poll_s=0.2))) as url:
            ok = _wait(lambda: (h := httpx.get(f"{url}/health").json())["checks"].get("spare") and h)
            assert ok["status"] == "ok" and ok["checks"]["spare"]["status"] == "ok"
            assert "spare" in ok["vllm"] and "big" not in ok["checks"]  # API backends are not probed
            spare.stop()  # the server dies
            bad = _wait(lambda: (h := httpx.get(f"{url}/health").json())["status"] != "ok" and h)
            assert bad["status"] == "degraded"
            assert bad["checks"]["spare"]["status"] == "down" and bad["checks"]["spare"]["error"]
            assert bad["checks"]["fast"]["status"] == "ok"
            assert "spare" not in bad["vllm"]  # its last figures are no longer shown as live
    finally:
        fast.stop()
        big.stop()


def test_a_stream_that_fails_part_way_is_booked_and_counted_as_failed(router):
    """A pass-through stream on a server that cuts it, with nowhere to resume: the client gets the
    partial text and an in-band error; the ledger books the generated tokens with the serving
    backend; /metrics counts a 502, not a 200."""
    fast, big = LoopbackThread(stream_usage=False).start(), LoopbackThread().start()
    try:
        engine = _engine(router, _catalog(fast, big))
        with Served(create_app(engine, ProxySettings(metrics_poll_s=None))) as url:
            fast.set_fault("cut_stream", after=6)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            text, failed = "", None
            try:
                for chunk in client.chat.completions.create(model="fast", messages=MSG, stream=True):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
            except openai.APIError as err:
                failed = err
            assert failed is not None and "stream failed" in str(failed)
            assert len(text.split()) == 6
            assert _wait(lambda: engine.ledger.count() == 1)
            row = engine.ledger.entries().iloc[-1]
            assert row["backend"] == "fast" and row["count"] == 1
            # the generated text's tokens (approx: chars / 4) at $0.2/M, plus the prompt at $0.1/M
            assert row["cost_usd"] >= len(text) / 4 * 0.2e-6 > 0
            assert _requests_total(url, "passthrough", "502") == 1
            assert _requests_total(url, "passthrough", "200") == 0
    finally:
        fast.set_fault("ok")
        fast.stop()
        big.stop()


def test_the_ledger_books_the_decided_model_and_the_serving_backend(router):
    """Several router models are aliased to one backend: the ledger keeps the one decided on (not
    the first alias) and the backend that served it."""
    fast, big = LoopbackThread().start(), LoopbackThread().start()
    try:
        engine = _engine(router, _catalog(fast, big))
        on_fast = [m for m, b in engine.aliases.items() if b == "fast"]
        assert len(on_fast) > 1
        with Served(create_app(engine, ProxySettings(metrics_poll_s=None))) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            decided = set()
            for knob in ("1e9", "1e3", "300", "100", "30"):
                raw = client.chat.completions.with_raw_response.create(
                    model=f"router:utility:{knob}", messages=MSG, max_tokens=16
                )
                if raw.parse().model == "fast":
                    decided.add(raw.headers["x-router-model"])
            rows = engine.ledger.entries()
            booked = rows[rows["backend"] == "fast"]
            assert decided and set(booked["model"]) == decided
            assert set(rows["backend"]) <= {"fast", "big"}
    finally:
        fast.stop()
        big.stop()


def test_the_ledger_books_the_decided_model_when_it_shares_a_backend_or_a_fallback_served(router):
    """The cases the old booking got wrong, forced: the decision's model is a later alias of the
    backend that served it, or a fallback on another backend served it."""
    from router_ml.decision.base import RoutingDecision

    fast, big = LoopbackThread().start(), LoopbackThread().start()
    try:
        engine = _engine(router, _catalog(fast, big))
        on_fast = [m for m, b in engine.aliases.items() if b == "fast"]
        later = on_fast[-1]
        assert later != on_fast[0]
        d = RoutingDecision(model=later, task="chat", task_confidence=1.0, predicted_quality={}, reason="")
        assert engine._booked_model(d, "fast") == later
        assert engine._booked_model(d, "big") == later  # a fallback served: still the decided model
        assert engine._booked_model(None, "fast") == on_fast[0]  # a pass-through: the first alias
    finally:
        fast.stop()
        big.stop()


def test_serve_prints_the_address_it_listens_on():
    code = (
        "from fastapi import FastAPI\n"
        "from router_ml.serving.proxy import serve\n"
        "serve(FastAPI(), '127.0.0.1', 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert line.startswith("router-ml proxy listening on http://127.0.0.1:"), line
        url = line.split()[4]
        assert httpx.get(f"{url}/openapi.json", timeout=10).status_code == 200  # it answers there
    finally:
        proc.terminate()  # by handle
        proc.wait(timeout=10)
