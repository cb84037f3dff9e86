"""Capability-aware routing end to end: a real trained router, the proxy under uvicorn, real
loopback HTTP backends with different capabilities, and the official ``openai`` client.

Backends: ``plain`` (a local server: no tools, no images), ``tooler`` (tools, JSON mode),
``tooler2`` (tools), ``seer`` (images). Without capability routing a tool request could land on
any of them, and ``plain`` (the only local one) would end every fallback chain as the last resort.
"""

from __future__ import annotations

import pytest

from router_ml.backends.catalog import Catalog
from router_ml.router import LearnedRouter
from router_ml.serving.engine import RoutingEngine
from router_ml.serving.engine_support import load_policy_configs
from router_ml.serving.proxy import create_app
from tests.fakes.loopback import LoopbackThread, answer_text, tool_call
from tests.test_proxy import Served

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

ALIASES = {
    "qwen2.5-1.5b-instruct": "plain",
    "qwen2.5-7b-instruct": "plain",
    "qwen2.5-coder-7b-instruct": "tooler",
    "gpt-4o-mini": "tooler",
    "gpt-4o": "tooler2",
    "claude-sonnet-4": "seer",
    "qwen2.5-32b-instruct": "seer",
}
CAPS = {
    "plain": {},
    "tooler": {"tools": True, "json_mode": True},
    "tooler2": {"tools": True},
    "seer": {"vision": True},
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
IMAGE = {
    "type": "image_url",
    "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==", "detail": "low"},
}


@pytest.fixture(scope="module")
def servers():
    srv = {name: LoopbackThread().start() for name in CAPS}
    yield srv
    for s in srv.values():
        s.stop()


@pytest.fixture(scope="module")
def proxy(trained_run, servers):
    entries = [
        {"name": name, "kind": "vllm" if name == "plain" else "api", "base_url": srv.base_url,
         "prices": {"input_per_mtok": 0.1 if name == "plain" else 2.0, "output_per_mtok": 0.2 if name == "plain" else 8.0},
         "latency": {"ttft_s": 0.05, "tokens_per_s": 100}, "first_token_timeout_s": 1,
         "context_window": 4096 if name == "plain" else 128_000, "capabilities": CAPS[name]}
        for name, srv in servers.items()
    ]  # fmt: skip
    router = LearnedRouter.from_pretrained(trained_run / "checkpoint")
    assert set(router.models) == set(ALIASES)
    engine = RoutingEngine(router, Catalog.from_entries(entries), load_policy_configs(), aliases=ALIASES)
    with Served(create_app(engine)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), engine


def _chats(servers) -> dict[str, int]:
    return {name: s.server.stats["chat"] for name, s in servers.items()}


def _new(before: dict[str, int], servers) -> dict[str, int]:
    return {k: v - before[k] for k, v in _chats(servers).items() if v != before[k]}


@pytest.mark.parametrize(
    "model", ["router", "router:utility:0", "router:cost_aware", "router:capability", "router:threshold"]
)
def test_a_tool_request_goes_only_to_a_tools_backend_and_its_call_arrives_whole(proxy, servers, model):
    client, _ = proxy
    before = _chats(servers)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=ASK, tools=TOOLS)
    reply, headers = raw.parse(), raw.headers
    served = headers["x-router-served-model"]
    assert served in ("tooler", "tooler2") and reply.model == served
    assert _new(before, servers) == {served: 1}
    # the decision and every fallback are tools-capable, although plain is the only local model
    chain = [headers["x-router-model"], *headers["x-router-fallbacks"].split(",")]
    assert {ALIASES[m] for m in chain if m} <= {"tooler", "tooler2"}
    assert "tools excluded plain, seer" in headers["x-router-reason"]
    sent = servers[served].server.last_request
    assert sent["tools"] == TOOLS and sent["messages"] == ASK  # passed on untouched
    want = tool_call({"tools": TOOLS, "messages": ASK})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == (want["id"], "function", "get_weather")
    assert call.function.arguments == want["function"]["arguments"]


def test_tool_choice_and_streamed_tool_call_deltas_arrive_intact(proxy, servers):
    client, _ = proxy
    choice = {"type": "function", "function": {"name": "get_time"}}
    stream = client.chat.completions.create(
        model="router", messages=ASK, tools=TOOLS, tool_choice=choice, stream=True
    )
    calls: dict[int, dict] = {}
    finish, models = None, set()
    for chunk in stream:
        models.add(chunk.model)
        for c in chunk.choices:
            assert not c.delta.content
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                acc = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                acc["id"] = tc.id or acc["id"]
                acc["name"] += (tc.function.name or "") if tc.function else ""
                acc["arguments"] += (tc.function.arguments or "") if tc.function else ""
    want = tool_call({"tools": TOOLS, "tool_choice": choice, "messages": ASK})
    assert calls == {0: {"id": want["id"], "name": "get_time", "arguments": want["function"]["arguments"]}}
    assert finish == "tool_calls" and models <= {"tooler", "tooler2"} and len(models) == 1
    assert servers[models.pop()].server.last_request["tool_choice"] == choice


def test_a_cut_tool_call_stream_is_not_resumed_as_text(proxy, servers):
    client, _ = proxy
    for name in ("tooler", "tooler2"):  # whichever the decision picks, the other is its fallback
        servers[name].server.set_fault("cut_stream", after=2, count=1)
    try:
        before = _chats(servers)
        got = []
        with pytest.raises(openai.APIError, match="inside a tool call"):
            for chunk in client.chat.completions.create(
                model="router", messages=ASK, tools=TOOLS, stream=True
            ):
                got.append(chunk)
    finally:
        for name in ("tooler", "tooler2"):
            servers[name].server.set_fault("ok")
    assert sum(_new(before, servers).values()) == 1  # no continuation was asked of anyone
    deltas = [c.choices[0].delta for c in got if c.choices]
    assert not any(d.content for d in deltas)
    args = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [])
    assert args == tool_call({"tools": TOOLS, "messages": ASK})["function"]["arguments"][:16]


@pytest.mark.parametrize("stream", [False, True])
def test_an_image_request_goes_only_to_the_vision_backend_with_its_parts_intact(proxy, servers, stream):
    client, _ = proxy
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, IMAGE]}]
    before = _chats(servers)
    raw = client.chat.completions.with_raw_response.create(model="router", messages=messages, stream=stream)
    if stream:
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    assert raw.headers["x-router-served-model"] == "seer" and _new(before, servers) == {"seer": 1}
    assert text == answer_text(messages) and text.startswith("I see 1 image.")
    assert servers["seer"].server.last_request["messages"] == messages
    assert "vision excluded plain, tooler, tooler2" in raw.headers["x-router-reason"]


def test_json_mode_goes_only_to_a_json_backend(proxy, servers):
    client, _ = proxy
    before = _chats(servers)
    raw = client.chat.completions.with_raw_response.create(
        model="router", messages=ASK, response_format={"type": "json_object"}
    )
    assert raw.headers["x-router-served-model"] == "tooler" and _new(before, servers) == {"tooler": 1}
    assert servers["tooler"].server.last_request["response_format"] == {"type": "json_object"}


def test_passthrough_to_a_backend_without_the_capability_is_a_400(proxy, servers):
    client, _ = proxy
    before = _chats(servers)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="plain", messages=ASK, tools=TOOLS)
    err = info.value.body
    assert (err["param"], err["code"]) == ("tools", "capability_unsupported")
    assert "backend 'plain' does not support function calling" in err["message"]
    assert "['tooler', 'tooler2']" in err["message"]
    ok = client.chat.completions.create(model="tooler2", messages=ASK, tools=TOOLS)  # a capable one
    assert ok.choices[0].finish_reason == "tool_calls"
    assert _new(before, servers) == {"tooler2": 1}


@pytest.mark.parametrize(
    "extra, param, code, words",
    [
        ({"tools": TOOLS, "messages": [{"role": "user", "content": [{"type": "text", "text": "see?"}, IMAGE]}]},
         "tools", "capability_unsupported", "needs function calling (tools) (field 'tools'), image input"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}}},
          "messages": [{"role": "user", "content": [{"type": "text", "text": "see?"}, IMAGE]}]},
         "messages", "capability_unsupported", "image input (field 'messages'), JSON mode"),
        ({"max_tokens": 200_000}, "messages", "context_length_exceeded", "a context window this long"),
    ],
)  # fmt: skip
def test_a_request_no_backend_can_serve_is_a_400_naming_the_capability(
    proxy, servers, extra, param, code, words
):
    client, _ = proxy
    before = _chats(servers)
    body = {"model": "router", "messages": ASK, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    err = info.value.body
    assert (err["param"], err["code"]) == (param, code) and words in err["message"]
    assert "no backend can serve this request" in err["message"]
    assert _new(before, servers) == {}
