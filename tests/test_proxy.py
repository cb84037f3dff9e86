"""The routing proxy end to end: a real trained router, real loopback HTTP backends, the real
FastAPI app under uvicorn on loopback, and the official ``openai`` client."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest

from router_ml.backends.catalog import Catalog
from router_ml.router import LearnedRouter
from router_ml.serving.engine import RoutingEngine
from router_ml.serving.engine_support import load_policy_configs
from router_ml.serving.proxy import ProxySettings, create_app
from tests.fakes.loopback import LoopbackThread

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

SECRET = "sk-test-" + "x" * 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The app under uvicorn in a thread, stopped on exit."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _eventually(check, timeout: float = 10.0):
    """``check()`` once it is truthy (or its last value after ``timeout`` s): the proxy books an
    answer (spend, routing log) once it is sent, so the booking may land a moment after the reply."""
    deadline = time.time() + timeout
    while not (got := check()) and time.time() < deadline:
        time.sleep(0.01)
    return got


@pytest.fixture(scope="module")
def backends():
    fast, big = LoopbackThread().start(), LoopbackThread().start()
    yield fast, big
    fast.stop()
    big.stop()


def _catalog(fast, big, big_model_id: str = "big") -> Catalog:
    return Catalog.from_entries(
        {
            "backends": [
                {
                    "name": "fast",
                    "kind": "vllm",
                    "base_url": fast.base_url,
                    "prices": {"input_per_mtok": 0.1, "output_per_mtok": 0.2},
                    "latency": {"ttft_s": 0.05, "tokens_per_s": 100},
                    "first_token_timeout_s": 1,
                },
                {
                    "name": "big",
                    "kind": "api",
                    "base_url": big.base_url,
                    "served_model_id": big_model_id,
                    "api_key_env": "ROUTER_ML_TEST_BIG_KEY",
                    "prices": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
                    "latency": {"ttft_s": 0.3, "tokens_per_s": 50},
                    "first_token_timeout_s": 1,
                },
            ]
        }
    )


@pytest.fixture(scope="module")
def router(trained_run):
    return LearnedRouter.from_pretrained(trained_run / "checkpoint")


def _engine(router, catalog, **kw) -> RoutingEngine:
    aliases = {m: ("fast" if m.startswith("qwen") else "big") for m in router.models}
    return RoutingEngine(router, catalog, load_policy_configs(), aliases=aliases, **kw)


@pytest.fixture(scope="module")
def proxy(router, backends, tmp_path_factory):
    import os

    from router_ml.serving.routing_log import RoutingLog

    os.environ["ROUTER_ML_TEST_BIG_KEY"] = SECRET
    log_path = tmp_path_factory.mktemp("proxy") / "routing.jsonl"
    engine = _engine(router, _catalog(*backends), routing_log=RoutingLog(log_path, log_prompts="full"))
    with Served(create_app(engine)) as url:
        yield url, engine, log_path


def test_routes_and_reports_the_decision(proxy, router):
    url, _, _ = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="router",
        messages=[{"role": "user", "content": "Is this review positive or negative? 'Arrived broken.'"}],
    )
    reply = raw.parse()
    assert reply.model in ("fast", "big") and reply.choices[0].message.content
    assert raw.headers["x-router-task"] == "classify"
    chosen = raw.headers["x-router-model"]  # the router's own model name ...
    assert chosen in router.models
    served = "fast" if chosen.startswith("qwen") else "big"
    assert reply.model == raw.headers["x-router-served-model"] == served  # ... served by its backend
    assert float(raw.headers["x-router-expected-cost-usd"]) > 0 and raw.headers["x-router-reason"]


def test_knob_per_request_changes_the_choice(proxy):
    url, _, _ = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    msg = [{"role": "user", "content": "Write a long, moving poem about the sea at night."}]
    free = client.chat.completions.with_raw_response.create(model="router:utility:0", messages=msg)
    frugal = client.chat.completions.with_raw_response.create(model="router:utility:1e9", messages=msg)
    assert frugal.headers["x-router-model"] != free.headers["x-router-model"]
    assert float(frugal.headers["x-router-expected-cost-usd"]) < float(
        free.headers["x-router-expected-cost-usd"]
    )


def test_streaming_through_the_proxy_with_the_openai_client(proxy):
    url, _, _ = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="router",
            stream=True,
            messages=[{"role": "user", "content": "Prove that sqrt(2) is irrational."}],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "sqrt(2)" in text and {c.model for c in chunks} <= {"fast", "big"}


def test_backend_name_passes_through(proxy, backends):
    url, _, _ = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="big", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().model == "big" and raw.headers["x-router-route"] == "passthrough"
    assert backends[1].server.last_request["model"] == "big"


@pytest.mark.parametrize(
    "body,status",
    [
        (b"[1, 2]", 400),
        (b"{not json", 400),
        (b"", 400),
        (json.dumps({"model": "router", "messages": []}).encode(), 400),
        (json.dumps({"model": "router"}).encode(), 400),
        (json.dumps({"model": "router", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
        (
            json.dumps(
                {"model": "router", "messages": [{"role": "user", "content": "x"}], "max_tokens": "abc"}
            ).encode(),
            400,
        ),
        (
            json.dumps(
                {"model": "router", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}
            ).encode(),
            400,
        ),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404),
        (
            json.dumps({"model": "router:oracle", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
        ),
        (
            json.dumps(
                {"model": "router", "messages": [{"role": "user", "content": "a" * (1 << 20)}]}
            ).encode(),
            413,
        ),
        (
            json.dumps(
                {"model": "router", "messages": [{"role": "user", "content": "a" * (8 << 20)}]}
            ).encode(),
            413,
        ),
    ],
)
def test_malformed_requests_get_a_4xx_before_any_backend_call(proxy, backends, body, status):
    url, _, _ = proxy
    before = sum(b.server.stats["chat"] for b in backends)
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"] and r.json()["error"]["type"] and r.json()["error"]["code"]
    assert sum(b.server.stats["chat"] for b in backends) == before


def test_fallback_when_the_chosen_backend_fails(proxy, backends):
    url, _, _ = proxy
    fast, _ = backends
    fast.set_fault("error500", count=10)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="router:utility:1e9",  # the cheapest model: a qwen, served by "fast"
            messages=[{"role": "user", "content": "Classify the sentiment: 'I love it'"}],
        )
        assert raw.headers["x-router-model"].startswith("qwen") and raw.parse().model == "big"
    finally:
        fast.set_fault("ok")
    line = next(
        x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith("router_ml_fallbacks_total")
    )
    assert float(line.split()[-1]) >= 1


def test_models_health_metrics(proxy):
    url, _, _ = proxy
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert ids[0] == "router" and "router:cost_aware" in ids and {"fast", "big"} <= set(ids)
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and set(health["backends"]) == {"fast", "big"}
    msg = {"model": "router", "messages": [{"role": "user", "content": "Summarise: the meeting moved."}]}
    reply = httpx.post(f"{url}/v1/chat/completions", json=msg, timeout=30)  # so every series has samples
    assert reply.status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("router_ml_requests_total", "router_ml_decisions_total", "router_ml_latency_seconds_bucket",
                 "router_ml_spend_usd_total", "router_ml_decision_seconds_count"):  # fmt: skip
        assert name in metrics, name


def test_api_keys_never_reach_logs(proxy, caplog):
    url, _, log_path = proxy
    caplog.set_level(logging.DEBUG)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    marker = "hello from the key-scrubbing test"
    client.chat.completions.create(model="big", messages=[{"role": "user", "content": marker}])
    mine = _eventually(lambda: [json.loads(x) for x in log_path.read_text().splitlines() if marker in x])
    text = log_path.read_text()
    assert mine and SECRET not in text and SECRET not in caplog.text
    assert mine[-1]["served_model"] == "big"


def test_backend_4xx_is_returned_not_retried_elsewhere(router, backends):
    strict = LoopbackThread(model_id="the-real-id").start()  # answers 404 to any other model id
    try:
        cat = _catalog(backends[0], strict, big_model_id="no-such-model")
        with Served(create_app(_engine(router, cat))) as url:
            before = backends[0].server.stats["chat"]
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "big", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 404 and "rejected" in r.json()["error"]["message"]
            assert strict.server.stats["chat"] == 1 and backends[0].server.stats["chat"] == before
    finally:
        strict.stop()


def test_budget_cap_holds_across_a_proxy_restart(router, backends, tmp_path):
    from router_ml.decision.ledger import BudgetLedger

    ledger_path = tmp_path / "spend.sqlite"
    policies = load_policy_configs()
    policies["cost_aware"].update(budget_usd=2e-5, horizon=1000, hard_cap_usd=2e-5)
    msg = {
        "model": "router:cost_aware",
        "messages": [{"role": "user", "content": "Summarise: the cat sat on the mat."}],
    }
    statuses = []
    for _ in range(2):  # the second engine is the restarted proxy on the same ledger file
        aliases = {m: ("fast" if m.startswith("qwen") else "big") for m in router.models}
        engine = RoutingEngine(
            router, _catalog(*backends), policies, aliases=aliases, ledger=BudgetLedger(ledger_path),
            default_max_tokens=16,  # a bound that fits a few calls under the tiny cap
        )  # fmt: skip
        with Served(create_app(engine)) as url:
            for _ in range(12):
                statuses.append(httpx.post(f"{url}/v1/chat/completions", json=msg).status_code)
            spent = BudgetLedger(ledger_path).spent()
        assert spent <= 2e-5
    assert 200 in statuses[:12] and 429 in statuses and statuses[-1] == 429
    assert statuses[12:] == [429] * 12  # after the restart the spent budget is still spent


def test_policies_are_fitted_on_the_checkpoints_fit_set(router, backends):
    """No data of the project's at start-up: the policies are fitted on the checkpoint's stored
    predictions, priced by the catalog, exactly as on the router's live predictions for those prompts."""
    import copy

    import numpy as np

    from router_ml.decision.layer import DecisionLayer
    from router_ml.decision.policies import build_policy

    engine = _engine(router, _catalog(*backends))
    fit, served = router.policy_fit, engine.served
    quality, tasks = router.predict_quality_and_task(fit.prompts)
    cols = [router.models.index(m) for m in served]
    for name in ("capability", "budget_ratio", "cost_aware", "threshold"):
        policy = build_policy(load_policy_configs()[name])
        live = DecisionLayer(policy, engine.pool, engine.cost_model, engine.latency_model)
        live.fit(live.estimates(fit.prompts, quality[:, cols], served, tasks))
        got, want = engine.layers[name].policy, live.policy
        fitted = {k: v for k, v in vars(want).items() if k.endswith("_") and not k.startswith("_")}
        assert fitted, name
        for key, value in fitted.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(getattr(got, key), value, rtol=1e-6, err_msg=f"{name}.{key}")
            else:
                assert getattr(got, key) == value, (name, key)

    old = copy.copy(router)
    old.policy_fit = None  # a checkpoint written before checkpoints carried one
    with pytest.raises(ValueError, match=r"no policy fit set .* re-export it"):
        _engine(old, _catalog(*backends))


def test_proxy_auth(router, backends, monkeypatch):
    monkeypatch.setenv("ROUTER_ML_TEST_PROXY_KEY", "proxy-secret-123")
    engine = _engine(router, _catalog(*backends))
    with Served(create_app(engine, ProxySettings(api_key_env="ROUTER_ML_TEST_PROXY_KEY"))) as url:
        body = {"model": "fast", "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        ok = httpx.post(
            f"{url}/v1/chat/completions", json=body, headers={"authorization": "Bearer proxy-secret-123"}
        )
        assert ok.status_code == 200


def test_sdk_routes_in_process(router, backends):
    from router_ml.serving.sdk import RouterClient

    with RouterClient(_engine(router, _catalog(*backends))) as client:
        reply = client.chat.completions.create(
            model="router:utility:1e9",
            messages=[{"role": "user", "content": "Is this spam? 'WIN A FREE PHONE'"}],
        )
        assert reply.model == "fast" and client.last_decision.task == "classify"
        chunks = list(
            client.chat.completions.create(
                model="big", stream=True, messages=[{"role": "user", "content": "hi"}]
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_concurrent_decisions_share_encoder_batches(router, backends):
    import asyncio

    engine = _engine(router, _catalog(*backends))
    prompts = [f"Classify the sentiment of review number {i}: 'it broke after {i} days'" for i in range(16)]
    calls = []
    real = engine.router.route_batch

    def counting(items, **kw):
        calls.append(len(items))
        return real(items, **kw)

    engine.router.route_batch = counting
    try:
        layer = engine.layers["utility"]

        async def all_at_once():
            return await asyncio.gather(*(engine.decide(p, layer, {}) for p in prompts))

        decisions = asyncio.run(all_at_once())
    finally:
        engine.router.route_batch = real
    assert sum(calls) == 16 and len(calls) < 16  # batched, every prompt decided once
    alone = [router.route(p, allowed_models=engine.served, policy=layer) for p in prompts]
    assert [d.model for d in decisions] == [d.model for d in alone]


# ------------------------------------------------------------------------------------ caps
def test_a_client_cannot_lift_the_policy_cap_via_the_model_knob(router, backends):
    policies = load_policy_configs()
    policies["cost_aware"].update(budget_usd=2e-5, horizon=1000, hard_cap_usd=2e-5)
    aliases = {m: ("fast" if m.startswith("qwen") else "big") for m in router.models}
    engine = RoutingEngine(router, _catalog(*backends), policies, aliases=aliases,
                           default_max_tokens=16)  # fmt: skip  # a bound that fits a few calls
    msg = {
        "model": "router:cost_aware:1e6",  # the knob asks for a $1M budget
        "messages": [{"role": "user", "content": "Summarise: the cat sat on the mat."}],
    }
    with Served(create_app(engine)) as url:
        statuses = [httpx.post(f"{url}/v1/chat/completions", json=msg).status_code for _ in range(12)]
    assert statuses[-1] == 429 and 200 in statuses
    assert engine.ledger.spent() <= 2e-5 and engine.ledger.reserved() == 0.0


def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Every body at once (one connection each), the responses in order."""
    import asyncio

    async def go():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=len(bodies))) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=b) for b in bodies))

    return asyncio.run(go())


def test_pass_through_is_booked_and_capped_under_concurrency(router, backends):
    """A $0.001 operator budget, 24 concurrent pass-through calls to the pricey backend (each may
    cost ~$0.0003 at the injected max_tokens): the spend never passes the cap, the refused get an
    OpenAI-style 429 with Retry-After, and a routed request is refused once the budget is spent."""
    from router_ml.decision.ledger import MemoryLedger

    cap, ledger = 1e-3, MemoryLedger()
    engine = _engine(router, _catalog(*backends), budget_usd=cap, default_max_tokens=16, ledger=ledger)
    body = {"model": "big", "messages": [{"role": "user", "content": "Say something about caps."}]}
    with Served(create_app(engine)) as url:
        replies = _post_all(url, [body] * 24)
        served = [r for r in replies if r.status_code == 200]
        refused = [r for r in replies if r.status_code == 429]
        assert len(served) + len(refused) == 24 and served and refused
        err = refused[0].json()["error"]
        assert (err["type"], err["code"]) == ("insufficient_quota", "budget_exhausted")
        assert int(refused[0].headers["retry-after"]) >= 1
        assert backends[1].server.last_request["max_tokens"] == 16  # the bound is real
        assert _eventually(lambda: ledger.count() == len(served))  # the last booking may trail its reply
        spent = ledger.spent()
        assert 0 < spent <= cap and ledger.reserved() == 0.0
        bill = sum(r.json()["usage"]["prompt_tokens"] * 3e-6 + r.json()["usage"]["completion_tokens"] * 15e-6
                   for r in served)  # fmt: skip
        assert spent == pytest.approx(bill)  # every pass-through answer is booked at its bill
        while True:  # spend what is left, then a routed request is refused as well
            if httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 429:
                break
        routed = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "router:utility:0"})
        assert routed.status_code == 429 and routed.json()["error"]["code"] == "budget_exhausted"
    assert ledger.spent() <= cap


def test_a_failed_call_releases_its_hold_and_an_open_circuit_answers_503(router, backends):
    from router_ml.decision.ledger import MemoryLedger

    fast = backends[0]
    ledger = MemoryLedger()
    engine = _engine(router, _catalog(*backends), budget_usd=1.0, ledger=ledger)
    body = {"model": "fast", "messages": [{"role": "user", "content": "hello"}]}
    fast.set_fault("error500", count=100)
    try:
        with Served(create_app(engine)) as url:
            first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert first.status_code == 502 and first.json()["error"]["code"] == "backends_failed"
            assert ledger.reserved() == 0.0 and ledger.count() == 0  # released, nothing booked
            statuses = [first.status_code]
            for _ in range(5):  # the breaker opens after repeated failures
                r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
                statuses.append(r.status_code)
                if r.status_code == 503:
                    break
            assert r.status_code == 503, statuses
            assert r.json()["error"]["code"] == "circuit_open" and 1 <= int(r.headers["retry-after"]) <= 5
            assert ledger.reserved() == 0.0
    finally:
        fast.set_fault("ok")
