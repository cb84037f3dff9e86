"""Capabilities: the catalog's fields, what a request needs, which backends lack it, the 400s, and a
tool-call stream that is never resumed as text (real loopback HTTP backends, the real client)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from router_ml.backends.capabilities import Needs, describe, exclusions, lacking
from router_ml.backends.catalog import Catalog, CatalogError
from router_ml.backends.client import BackendClient
from router_ml.backends.results import StreamInterrupted
from router_ml.serving.chat_request import validate_chat
from router_ml.serving.request_needs import needs_of, passthrough_error, unservable_error
from tests.fakes.loopback import LoopbackServer, tool_call

ROOT = Path(__file__).resolve().parents[1]
PRICES = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def _entry(name: str, **kw) -> dict:
    return {"name": name, "kind": "api", "base_url": "http://127.0.0.1:9/v1", "prices": PRICES, **kw}


def _needs(**body) -> Needs:
    body = {"model": "router", "messages": [{"role": "user", "content": "hello there"}], **body}
    req, _ = validate_chat(body, 100_000)
    return needs_of(req, body)


# ---- the catalog -----------------------------------------------------------------------------
def test_capabilities_are_off_unless_the_catalog_sets_them():
    cat = Catalog.from_entries(
        [_entry("plain"), _entry("tooler", capabilities={"tools": True, "json_mode": True})]
    )
    assert cat.get("plain").capabilities == frozenset()
    assert cat.get("tooler").capabilities == {"tools", "json_mode"}


@pytest.mark.parametrize(
    "caps, problem",
    [
        (
            {"tool": True},
            "unknown field 'capabilities.tool'; allowed fields: ['tools', 'vision', 'json_mode']",
        ),
        ({"vision": "yes"}, "field 'capabilities.vision' = 'yes': Input should be a valid boolean"),
        ({"json_mode": 1}, "field 'capabilities.json_mode' = 1: Input should be a valid boolean"),
    ],
)
def test_a_bad_capability_names_file_backend_and_field(caps, problem):
    with pytest.raises(CatalogError) as info:
        Catalog.from_entries([_entry("gpt", capabilities=caps)], source="conf/backends/x.yaml")
    assert str(info.value) == f"conf/backends/x.yaml: backend 'gpt': {problem}"


def test_the_shipped_catalogs_declare_capabilities():
    cat = Catalog.load(ROOT / "conf" / "backends")
    assert cat.get("gpt-4o").capabilities == {"tools", "vision", "json_mode"}
    assert cat.get("claude-sonnet-4").capabilities == {"tools", "vision"}
    for local in ("smollm2-vllm", "smollm2-llamacpp"):
        assert cat.get(local).capabilities == {"json_mode"}
        assert cat.get(local).spec.context_window == 2048


# ---- what a request needs --------------------------------------------------------------------
def test_a_plain_request_needs_nothing_but_room_for_its_prompt():
    n = _needs(max_tokens=50)
    assert n.features == frozenset() and n.output_tokens == 50 and n.messages == 1
    assert n.prompt_bytes == len("hello there") and n.bound() == 11 + 8 + 50
    assert _needs().output_tokens == 1
    body = {"model": "router", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50}
    req, _ = validate_chat(body, 1000)
    assert needs_of(req, body, window=4 * 11 + 1 + 8 + 50) is None  # surely fits: nothing built
    assert needs_of(req, body, window=70).bound() == 69  # the bound cannot tell: measured
    assert needs_of(req, {**body, "tools": TOOLS}, window=10**6).features == {"tools"}


@pytest.mark.parametrize(
    "body, features, params",
    [
        ({"tools": TOOLS}, {"tools"}, {"tools": "tools"}),
        ({"tools": TOOLS, "tool_choice": "none"}, {"tools"}, {"tools": "tools"}),
        ({"functions": [TOOLS[0]["function"]]}, {"tools"}, {"tools": "functions"}),
        ({"response_format": {"type": "json_object"}}, {"json_mode"}, {"json_mode": "response_format"}),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
         {"json_mode"}, {"json_mode": "response_format"}),
        ({"response_format": {"type": "text"}}, set(), {}),
        ({"tools": []}, set(), {}),
    ],
)  # fmt: skip
def test_needs_from_request_fields(body, features, params):
    n = _needs(**body)
    assert n.features == features and n.params == params


def test_image_parts_and_tool_turns_in_the_messages_are_needs():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]}]
    n = _needs(messages=msgs)
    assert n.features == {"vision"} and n.params == {"vision": "messages"}
    call = tool_call({"tools": TOOLS, "messages": [{"role": "user", "content": "Paris"}]})
    turns = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
    ]
    assert _needs(messages=turns).features == {"tools"}
    assert _needs(messages=turns).params == {"tools": "messages"}


def test_tool_definitions_count_towards_the_prompt():
    assert _needs(tools=TOOLS).prompt_bytes > _needs().prompt_bytes + len(json.dumps(TOOLS)) // 2


# ---- which backends lack it --------------------------------------------------------------------
def test_lacking_names_capabilities_and_the_context_window():
    cat = Catalog.from_entries(
        [
            _entry("tiny", capabilities={"tools": True}, context_window=64),
            _entry("seer", capabilities={"vision": True}, context_window=100_000),
            _entry("open", context_window=None),
        ]
    )
    needs = _needs(tools=TOOLS, max_tokens=40)
    assert lacking(cat.get("seer"), needs) == ["tools"]
    assert lacking(cat.get("open"), needs) == ["tools"]  # no window set: not checked
    assert lacking(cat.get("tiny"), _needs(max_tokens=40)) == []  # 11 bytes + 8 + 40 <= 64
    assert lacking(cat.get("tiny"), needs) == ["context_window"]  # + the tool definitions
    # over the byte bound, the backend's tokenizer decides
    assert lacking(cat.get("tiny"), needs, lambda b, text: 10) == []
    assert lacking(cat.get("tiny"), needs, lambda b, text: 20) == ["context_window"]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "x"}, IMAGE]}]
    ex = exclusions(list(cat), _needs(tools=TOOLS, messages=msgs))
    assert ex == {"tiny": ["vision", "context_window"], "seer": ["tools"], "open": ["tools", "vision"]}
    assert (
        describe(ex) == "tools excluded seer, open; vision excluded tiny, open; context_window excluded tiny"
    )


def test_the_400_names_the_capability_the_field_and_the_backends():
    needs = _needs(tools=TOOLS, response_format={"type": "json_object"})
    body = passthrough_error("fast", ["tools"], needs, ["big"]).body()["error"]
    assert body["param"] == "tools" and body["code"] == "capability_unsupported"
    assert "backend 'fast' does not support function calling (tools) (field 'tools')" in body["message"]
    assert "backends that can serve it: ['big']" in body["message"]
    err = unservable_error(needs, {"fast": ["tools", "json_mode"], "big": ["json_mode"]})
    assert err.status == 400 and err.body()["error"]["param"] == "response_format"
    assert "needs JSON mode (response_format)" in err.message  # the one no backend has
    assert "tools excluded fast; json_mode excluded fast, big" in err.message
    ctx = unservable_error(_needs(max_tokens=9000), {"fast": ["context_window"]}).body()["error"]
    assert ctx["code"] == "context_length_exceeded" and ctx["param"] == "messages"


# ---- tool calls through the client ----------------------------------------------------------------
def _catalog(*ports: int) -> Catalog:
    return Catalog.from_entries(
        [
            {"name": f"b{i}", "kind": "vllm", "base_url": f"http://127.0.0.1:{p}/v1", "prices": PRICES,
             "tokenizer": "approx", "first_token_timeout_s": 1, "capabilities": {"tools": True}}
            for i, p in enumerate(ports)
        ]
    )  # fmt: skip


PAYLOAD = {"messages": [{"role": "user", "content": "What is the weather in Paris today?"}], "tools": TOOLS}


def _arguments(chunks) -> tuple[str, list[str]]:
    args, ids = "", []
    for c in chunks:
        for tc in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            args += tc["function"].get("arguments", "")
            ids += [tc["id"]] if "id" in tc else []
    return args, ids


def test_a_tool_call_stream_cut_midway_is_not_resumed_as_text():
    async def main():
        async with (
            LoopbackServer() as a,
            LoopbackServer() as b,
            BackendClient(_catalog(a.port, b.port)) as client,
        ):
            a.set_fault("cut_stream", after=2)
            stream = await client.chat_with_fallback(["b0", "b1"], PAYLOAD, stream=True)
            got = []
            with pytest.raises(StreamInterrupted) as info:
                async for chunk in stream:
                    got.append(chunk)
            return got, info.value, b.stats["chat"]

    got, err, second = asyncio.run(asyncio.wait_for(main(), 20))
    args, ids = _arguments(got)
    whole = tool_call(PAYLOAD)["function"]["arguments"]
    assert args == whole[:16] and len(ids) == 1  # two 8-character pieces, then the cut
    assert "inside a tool call" in str(err) and second == 0  # the fallback was never asked
    assert not any((c["choices"][0]["delta"].get("content") or "") for c in got if c["choices"])


def test_a_tool_call_stream_falls_back_before_its_first_delta_and_arrives_whole():
    async def main():
        async with (
            LoopbackServer() as a,
            LoopbackServer() as b,
            BackendClient(_catalog(a.port, b.port)) as client,
        ):
            a.set_fault("error500")
            stream = await client.chat_with_fallback(["b0", "b1"], PAYLOAD, stream=True)
            return [c async for c in stream], stream.result

    chunks, res = asyncio.run(asyncio.wait_for(main(), 20))
    args, ids = _arguments(chunks)
    want = tool_call(PAYLOAD)
    assert args == want["function"]["arguments"] and ids == [want["id"]]
    assert res.backend == "b1" and res.finish_reason == "tool_calls"


def test_a_tool_call_stream_without_usage_counts_its_arguments_as_output():
    async def main():
        async with (
            LoopbackServer(stream_usage=False) as srv,
            BackendClient(_catalog(srv.port)) as client,
        ):
            stream = await client.stream("b0", PAYLOAD)
            return [c async for c in stream], stream.result

    _, res = asyncio.run(asyncio.wait_for(main(), 20))
    want = tool_call(PAYLOAD)["function"]
    assert res.usage_source == "counted" and res.text == ""
    assert res.completion_tokens == math.ceil(len(want["name"] + want["arguments"]) / 4)  # "approx"
