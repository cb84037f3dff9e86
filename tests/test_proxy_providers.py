"""The proxy in front of native provider APIs: the real ``openai`` client -> router-ml proxy (uvicorn,
a real trained router) -> loopback servers speaking Anthropic's Messages API and Azure OpenAI's
wire format (:mod:`tests.fakes.anthropic_server`, :mod:`tests.fakes.azure_server`).

Answers, streams, a tool-use round trip, stop reasons, usage with cached tokens and the bill in
the routing log, upstream errors mapped to OpenAI-style errors, fallback between providers. In the
full tier (the router is trained in-process).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from router_ml.backends.catalog import Catalog
from router_ml.router import LearnedRouter
from router_ml.serving.engine import RoutingEngine
from router_ml.serving.engine_support import load_policy_configs
from router_ml.serving.proxy import create_app
from tests.fakes.anthropic_server import AnthropicServer
from tests.fakes.azure_server import AzureServer
from tests.fakes.loopback import LoopbackThread, answer_text
from tests.test_providers import TOOLS
from tests.test_proxy import Served

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

CLAUDE_PRICES = {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cached_input_per_mtok": 0.3,
                 "cache_write_per_mtok": 3.75}  # fmt: skip
CAPS = {"tools": True, "vision": True}


@pytest.fixture(scope="module")
def providers():
    ant = LoopbackThread(AnthropicServer, api_key="ant-proxy-key").start()
    az = LoopbackThread(
        AzureServer, deployments={"chat": "gpt-4o-2024-08-06"}, api_key="az-proxy-key"
    ).start()
    yield ant, az
    ant.stop()
    az.stop()


@pytest.fixture(scope="module")
def proxy(trained_run, providers, tmp_path_factory):
    import os

    from router_ml.serving.routing_log import RoutingLog

    os.environ["T_PROXY_ANT_KEY"], os.environ["T_PROXY_AZ_KEY"] = "ant-proxy-key", "az-proxy-key"
    ant, az = providers
    catalog = Catalog.from_entries(
        [
            {"name": "claude", "kind": "api", "api": "anthropic", "base_url": ant.url,
             "api_key_env": "T_PROXY_ANT_KEY", "served_model_id": "claude-x", "max_tokens": 128,
             "first_token_timeout_s": 2, "max_retries": 1, "prices": CLAUDE_PRICES, "capabilities": CAPS},
            {"name": "azure-gpt", "kind": "api", "api": "azure", "base_url": az.url,
             "api_key_env": "T_PROXY_AZ_KEY", "deployment": "chat", "api_version": "2024-10-21",
             "first_token_timeout_s": 2, "max_retries": 1, "capabilities": CAPS,
             "prices": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}},
        ]
    )  # fmt: skip
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    aliases = {m: ("azure-gpt" if m.startswith("qwen") else "claude") for m in router.models}
    log_path = tmp_path_factory.mktemp("providers") / "routing.jsonl"
    engine = RoutingEngine(
        router, catalog, load_policy_configs(), aliases=aliases,
        routing_log=RoutingLog(log_path, log_prompts="full"),
    )  # fmt: skip
    with Served(create_app(engine)) as url:
        yield url, engine, log_path


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _lines(log_path) -> list[str]:
    return log_path.read_text().splitlines() if log_path.exists() else []


def _log_of(log_path, marker: str) -> dict:
    """The routing-log line of the request whose prompt carries ``marker`` (prompts are logged in
    full here): the proxy books an answer once it is sent, so the line may land a moment after the
    client has the response."""
    deadline = time.time() + 10
    while time.time() < deadline:
        found = [json.loads(x) for x in _lines(log_path) if marker in x]
        if found:
            return found[-1]
        time.sleep(0.01)
    raise AssertionError(f"no routing-log line for {marker!r}")


USER = [{"role": "user", "content": "hello proxy"}]


@pytest.mark.parametrize("backend", ["claude", "azure-gpt"])
def test_answers_and_streams_through_the_proxy(proxy, backend):
    url, _, _ = proxy
    client = _client(url)
    reply = client.chat.completions.create(model=backend, messages=USER)
    want = answer_text(USER)
    assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == "stop"
    assert reply.model == backend and reply.usage.completion_tokens == 13
    chunks = list(
        client.chat.completions.create(
            model=backend, messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 13 and chunks[-1].usage.prompt_tokens > 0


def test_cached_tokens_reach_the_client_and_the_bill(proxy):
    url, _, log_path = proxy
    client = _client(url)
    system = {"role": "system", "content": [{"type": "text", "text": "House rules, long. " * 12,
                                             "cache_control": {"type": "ephemeral"}}]}  # fmt: skip
    first = client.chat.completions.create(
        model="claude", messages=[system, {"role": "user", "content": "cache me: call-1"}]
    )
    first_bill = _log_of(log_path, "call-1")["cost_usd"]
    chunks = list(
        client.chat.completions.create(
            model="claude", messages=[system, {"role": "user", "content": "cache me: call-2"}], stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    second_bill = _log_of(log_path, "call-2")["cost_usd"]
    usage = chunks[-1].usage
    cached = usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0 and cached > 0
    assert first.usage.prompt_tokens == usage.prompt_tokens
    uncached, out = usage.prompt_tokens - cached, usage.completion_tokens
    assert first_bill == pytest.approx((uncached * 3.0 + cached * 3.75 + out * 15.0) / 1e6)
    assert second_bill == pytest.approx((uncached * 3.0 + cached * 0.3 + out * 15.0) / 1e6)


@pytest.mark.parametrize("backend", ["claude", "azure-gpt"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_use_round_trip(proxy, providers, backend, stream):
    url, _, _ = proxy
    client = _client(url)
    messages = [{"role": "user", "content": "weather in Paris"}]
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(
            model=backend, messages=messages, tools=TOOLS, stream=True
        ):
            if not chunk.choices:
                continue
            finish = chunk.choices[0].finish_reason or finish
            for d in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
        call = calls[0]
    else:
        reply = client.chat.completions.create(model=backend, messages=messages, tools=TOOLS)
        finish, tc = reply.choices[0].finish_reason, reply.choices[0].message.tool_calls[0]
        call = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
    assert finish == "tool_calls" and call["name"] == "search"
    assert json.loads(call["arguments"]) == {"query": "weather in Paris"}
    turn = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": "search", "arguments": call["arguments"]}}]}  # fmt: skip
    follow = [*messages, turn, {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model=backend, messages=follow, tools=TOOLS, tool_choice="none")
    assert answer.choices[0].finish_reason == "stop"
    if backend == "claude":  # the Messages API saw a tool_use block answered by its tool_result
        sent = providers[0].server.last_request["messages"]
        assert sent[1]["content"][-1]["type"] == "tool_use" and sent[1]["content"][-1]["id"] == call["id"]
        assert sent[2]["content"][0] == {
            "type": "tool_result",
            "tool_use_id": call["id"],
            "content": "sunny, 21 C",
        }


def test_stop_reasons_translate(proxy):
    url, _, _ = proxy
    client = _client(url)
    short = client.chat.completions.create(model="claude", messages=USER, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    stopped = client.chat.completions.create(model="claude", messages=USER, stop=["deterministic"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == answer_text(USER).split("deterministic")[0]


def test_provider_errors_become_openai_errors(proxy, providers):
    url, _, _ = proxy
    ant, _ = providers
    client = _client(url)
    with pytest.raises(openai.BadRequestError) as err:  # Anthropic's 400, its message carried
        client.chat.completions.create(model="claude", messages=USER, temperature=1.7)
    assert "temperature" in err.value.message and "claude" in err.value.message
    with pytest.raises(openai.BadRequestError, match="Messages API"):  # refused before any call
        client.chat.completions.create(model="claude", messages=USER, logprobs=True)
    ant.set_fault("error503", count=10)  # 529 overloaded on every try
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "claude", "messages": USER}, timeout=30)
    finally:
        ant.set_fault("ok")
    assert r.status_code == 502 and r.json()["error"]["code"] == "backends_failed"
    assert "529" in r.json()["error"]["message"]


def test_a_routed_request_falls_back_across_providers(proxy, providers):
    url, _, _ = proxy
    ant, az = providers
    ant.set_fault("error503", count=50)
    az.set_fault("ok")
    try:
        raw = _client(url).chat.completions.with_raw_response.create(
            model="router:utility:0",
            messages=[{"role": "user", "content": "Write a long poem about rivers."}],
        )
    finally:
        ant.set_fault("ok")
    reply = raw.parse()
    assert reply.model in ("claude", "azure-gpt") and reply.choices[0].message.content
    if raw.headers.get("x-router-tried"):  # claude was chosen, failed with 529, azure answered
        assert raw.headers["x-router-tried"] == "claude,azure-gpt" and reply.model == "azure-gpt"
        assert "529" in raw.headers["x-router-fallback-errors"]
