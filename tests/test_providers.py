"""Native provider wire formats: Anthropic's Messages API and Azure OpenAI, and per-backend headers.

Translation units (request -> Messages body, answer and stream events -> Chat Completions), the
catalog's ``api`` / ``headers`` / ``deployment`` / ``api_version`` fields, the loopback fakes'
fidelity (driven by the official ``anthropic`` SDK and ``openai``'s ``AzureOpenAI``), and the
:class:`~router_ml.backends.client.BackendClient` against them: answers, streams, tool round
trips, stop reasons, usage and the bill with cached tokens, errors, fallback and stream resumption.
The servers start in milliseconds on loopback, so these stay in the fast tier.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from router_ml.backends import anthropic as wire
from router_ml.backends.catalog import Catalog, CatalogError
from router_ml.backends.client import BackendClient
from router_ml.backends.results import AllBackendsFailed, BackendError, BadRequest
from tests.fakes.anthropic_server import AnthropicServer
from tests.fakes.azure_server import AzureServer
from tests.fakes.loopback import LoopbackServer, LoopbackThread, answer_text

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
PRICES = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}


# ------------------------------------------------------------------------------ translation units
def test_a_chat_request_becomes_a_messages_body():
    payload = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Answer in English."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "search", "arguments": '{"query": "cat"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "user", "content": "And now?"},
        ],
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": "END",
        "temperature": 0.3,
        "top_p": 0.9,
        "max_completion_tokens": 77,
        "user": "u-1",
        "stream_options": {"include_usage": True},  # no Messages API word: left out
        "seed": 1,
    }
    body = wire.to_messages(payload, "claude-x", 4096, stream=True)
    assert body["model"] == "claude-x" and body["max_tokens"] == 77 and body["stream"] is True
    assert body["system"] == "Be brief.\n\nAnswer in English."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    user = body["messages"][0]["content"]
    assert user[0] == {"type": "text", "text": "What is in"}
    assert user[1]["source"] == {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    assert user[2]["source"] == {"type": "url", "url": "https://example.com/cat.jpg"}
    assistant = body["messages"][1]["content"]
    assert assistant[1] == {"type": "tool_use", "id": "call_1", "name": "search", "input": {"query": "cat"}}
    last = body["messages"][2]["content"]  # the tool result and the next user text share one turn
    assert last[0] == {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"}
    assert last[1] == {"type": "text", "text": "And now?"}
    assert body["tools"] == [
        {
            "name": "search",
            "description": "Search the web",
            "input_schema": TOOLS[0]["function"]["parameters"],
        }
    ]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["stop_sequences"] == ["END"] and body["metadata"] == {"user_id": "u-1"}
    assert (body["temperature"], body["top_p"]) == (0.3, 0.9)
    assert not {"stream_options", "seed", "tool_calls", "stop", "user"} & set(body)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "search"}}, {"type": "tool", "name": "search"}),
    ],
)
def test_tool_choice_maps(choice, expected):
    msgs = [{"role": "user", "content": "x"}]
    body = wire.to_messages({"messages": msgs, "tools": TOOLS, "tool_choice": choice}, "m", 10, False)
    assert body["tool_choice"] == expected and "stream" not in body


def test_max_tokens_defaults_to_the_catalogs_and_cached_parts_keep_their_marker():
    sys_part = {"type": "text", "text": "long rules", "cache_control": {"type": "ephemeral"}}
    body = wire.to_messages(
        {"messages": [{"role": "system", "content": [sys_part]}, {"role": "user", "content": "q"}]},
        "m",
        321,
        False,
    )
    assert body["max_tokens"] == 321
    assert body["system"] == [sys_part]  # a list when a block carries cache_control


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"n": 2}, "'n'"),
        ({"logprobs": True}, "'logprobs'"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "at least one user"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{not json"},
                            }
                        ],
                    }
                ]
            },
            "arguments: not valid JSON",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            r"messages\[0\]\.content\[0\]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:text/plain,hi"}}],
                    }
                ]
            },
            "data:image",
        ),
        ({"tool_choice": 7, "tools": TOOLS}, "tool_choice"),
    ],
)
def test_untranslatable_requests_name_the_field(payload, problem):
    full = {"messages": [{"role": "user", "content": "x"}], **payload}
    with pytest.raises(wire.TranslationError, match=problem):
        wire.to_messages(full, "m", 10, False)


def test_empty_messages_are_dropped_and_turns_of_one_role_merged():
    msgs = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "  "}, {"type": "text", "text": "second"}]},
    ]
    body = wire.to_messages({"messages": msgs}, "m", 10, False)
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}
    ]


def test_a_prefill_loses_its_trailing_whitespace():
    msgs = [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two "}]
    body = wire.to_messages({"messages": msgs}, "m", 10, False)
    assert body["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "one two"}]}


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_an_answer_translates_back(reason, finish):
    data = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "stop_reason": reason,
        "content": [
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"query": "é"}},
        ],
        "usage": {
            "input_tokens": 5,
            "output_tokens": 7,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20,
        },
    }
    out = wire.to_chat_completion(data)
    choice = out["choices"][0]
    assert choice["finish_reason"] == finish and choice["message"]["content"] == "Calling."
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "toolu_1" and json.loads(call["function"]["arguments"]) == {"query": "é"}
    assert out["usage"]["prompt_tokens"] == 125 and out["usage"]["completion_tokens"] == 7
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}
    assert out["usage"]["cache_creation_input_tokens"] == 20


def test_stream_events_become_chunks():
    t = wire.StreamTranslator()
    events = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_9",
                "model": "c",
                "usage": {"input_tokens": 4, "cache_read_input_tokens": 6, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_2", "name": "search", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"q":'},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '"x"}'},
        },
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]
    chunks = [c for e in events for c in t.feed(e)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[1] == {"content": "Hi"}
    assert deltas[2]["tool_calls"][0] == {
        "index": 0,
        "id": "toolu_2",
        "type": "function",
        "function": {"name": "search", "arguments": ""},
    }
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:] if "tool_calls" in d)
    assert json.loads(args) == {"q": "x"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 10
    assert chunks[-1]["usage"]["completion_tokens"] == 9 and t.done
    assert {c["id"] for c in chunks} == {"msg_9"}
    with pytest.raises(wire.StreamError, match="overloaded_error"):
        t.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


# ----------------------------------------------------------------------------------- the catalog
def _entry(**kw):
    return {"name": "m1", "kind": "api", "base_url": "https://api.example.com", "prices": PRICES} | kw


def test_catalog_fields_build_urls_and_headers(monkeypatch):
    cat = Catalog.from_entries(
        [
            _entry(
                name="claude",
                api="anthropic",
                max_tokens=1024,
                headers={"anthropic-beta": "token-efficient-tools-2025-02-19"},
            ),
            _entry(
                name="az",
                api="azure",
                deployment="chat prod",
                api_version="2024-10-21",
                headers={"X-Gateway": {"env": "GW_TOKEN"}},
            ),
            _entry(
                name="oa", base_url="https://api.openai.com/v1/", headers={"OpenAI-Organization": "org-1"}
            ),
        ]
    )
    claude, az, oa = cat.get("claude"), cat.get("az"), cat.get("oa")
    assert claude.chat_url == "https://api.example.com/v1/messages" and claude.api_version == "2023-06-01"
    assert claude.extra_headers() == {"anthropic-beta": "token-efficient-tools-2025-02-19"}
    assert az.chat_url == (
        "https://api.example.com/openai/deployments/chat%20prod/chat/completions?api-version=2024-10-21"
    )
    assert oa.chat_url == "https://api.openai.com/v1/chat/completions" and oa.api == "openai"
    monkeypatch.delenv("GW_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="GW_TOKEN, which is unset"):
        az.extra_headers()
    monkeypatch.setenv("GW_TOKEN", "s3cret-token")
    assert az.extra_headers() == {"X-Gateway": "s3cret-token"} and "s3cret-token" in az.secrets()
    assert "s3cret" not in repr(az) and "api='azure'" in repr(az)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (_entry(api="bedrock"), "field 'api' = 'bedrock'"),
        (_entry(api="anthropic"), "field 'max_tokens' is missing: api 'anthropic'"),
        (_entry(api="azure"), "field 'api_version' is missing"),
        (
            _entry(api="anthropic", max_tokens=8, capabilities={"json_mode": True}),
            "field 'capabilities.json_mode': api 'anthropic' has no response_format",
        ),
        (_entry(deployment="d"), "field 'deployment' is only for api 'azure'"),
        (_entry(api_version="2024-10-21"), "field 'api_version' is only for"),
        (_entry(kind="vllm", api="azure", api_version="v"), "needs kind 'api'"),
        (_entry(headers={"X-Key": "sk-ant-abcdefghijklmnop"}), "header 'X-Key' looks like a literal secret"),
        (_entry(headers={"X-Bad": "a\r\nInjected: 1"}), "line break"),
        (_entry(headers={"X-Token": "3f9aB71cE02d94aa5b6c7d8e9f0a1b2c"}), "looks like a literal secret"),
        (_entry(headers={"x-api-key": "v"}), "'x-api-key' is set by router-ml"),
        (_entry(headers={"Bad Name": "v"}), "not a valid header name"),
        (_entry(headers={"X-T": {"env": "not-a-name"}}), "must be an environment variable name"),
        (_entry(headers={"X-T": {"value": "v"}}), "a string or {env: NAME}"),
        (_entry(prices={**PRICES, "cached_input_per_mtok": -1.0}), "prices.cached_input_per_mtok"),
    ],
)
def test_catalog_errors_name_file_backend_and_field(entry, problem):
    with pytest.raises(CatalogError) as err:
        Catalog.from_entries([entry], source="conf/backends/x.yaml")
    msg = str(err.value)
    assert msg.startswith("conf/backends/x.yaml: backend 'm1': ") and problem in msg
    assert "abcdefghijklmnop" not in msg  # a pasted secret is never echoed


# ---------------------------------------------------------- the fakes, driven by the official SDKs
@pytest.fixture
def anthropic_fake():
    with LoopbackThread(AnthropicServer, api_key="ant-test-key") as srv:
        yield srv


@pytest.fixture
def azure_fake():
    with LoopbackThread(AzureServer, deployments={"chat": "gpt-4o-2024-08-06"}, api_key="az-test-key") as srv:
        yield srv


def test_anthropic_sdk_talks_to_the_fake(anthropic_fake):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=anthropic_fake.url, api_key="ant-test-key", max_retries=0)
    msg = client.messages.create(
        model="claude-x",
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": "hello there"}],
    )
    assert msg.content[0].text == answer_text([{"role": "user", "content": "hello there"}])
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == 13 and msg.usage.input_tokens > 0
    tool = {"name": "search", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}
    with client.messages.stream(
        model="claude-x", max_tokens=64, tools=[tool], messages=[{"role": "user", "content": "find cats"}]
    ) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_message()
    assert {"message_start", "content_block_start", "content_block_stop", "message_stop"} <= kinds
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.name == "search" and use.input == {"query": "find cats"} and final.stop_reason == "tool_use"
    follow = client.messages.create(
        model="claude-x",
        max_tokens=64,
        tools=[tool],
        messages=[
            {"role": "user", "content": "find cats"},
            {"role": "assistant", "content": final.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3 cats"}],
            },
        ],
    )
    assert follow.content[0].text == "The tool said: 3 cats." and follow.stop_reason == "end_turn"
    cached = {"type": "text", "text": "Long shared rules " * 20, "cache_control": {"type": "ephemeral"}}
    usage = [
        client.messages.create(
            model="claude-x", max_tokens=8, system=[cached], messages=[{"role": "user", "content": q}]
        ).usage
        for q in ("first question", "second question")
    ]
    assert usage[0].cache_creation_input_tokens > 0 and usage[0].cache_read_input_tokens == 0
    assert usage[1].cache_read_input_tokens == usage[0].cache_creation_input_tokens


def test_anthropic_sdk_sees_the_apis_errors(anthropic_fake):
    anthropic = pytest.importorskip("anthropic")
    bad = anthropic.Anthropic(base_url=anthropic_fake.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    client = anthropic.Anthropic(base_url=anthropic_fake.url, api_key="ant-test-key", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="trailing whitespace"):
        client.messages.create(
            model="m",
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "partial "}],
        )
    anthropic_fake.set_fault("error503", count=1)  # Anthropic's 529 overloaded_error
    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 529 and err.value.body["error"]["type"] == "overloaded_error"


def test_azure_openai_client_talks_to_the_fake(azure_fake):
    openai = pytest.importorskip("openai")
    client = openai.AzureOpenAI(
        azure_endpoint=azure_fake.url, api_key="az-test-key", api_version="2024-10-21", max_retries=0
    )
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi you"}])
    assert reply.model == "gpt-4o-2024-08-06" and reply.choices[0].message.content.startswith(
        "You said: hi you."
    )
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi you"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices == [] and chunks[0].model == ""  # Azure's prompt_filter_results chunk
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content and chunks[-1].usage.completion_tokens > 0
    assert azure_fake.server.last_headers["api-key"] == "az-test-key"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such", messages=[{"role": "user", "content": "x"}])
    wrong = openai.AzureOpenAI(
        azure_endpoint=azure_fake.url, api_key="no", api_version="2024-10-21", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])


# -------------------------------------------------------------------- the backend client on them
def _catalog(ant: AnthropicServer, az: AzureServer, oa: LoopbackServer, **claude) -> Catalog:
    return Catalog.from_entries(
        [
            {
                "name": "claude",
                "kind": "api",
                "api": "anthropic",
                "base_url": ant.url,
                "api_key_env": "T_ANT_KEY",
                "served_model_id": "claude-x",
                "max_tokens": 64,
                "first_token_timeout_s": 2,
                "prices": {**PRICES, "cached_input_per_mtok": 0.3, "cache_write_per_mtok": 3.75},
                **claude,
            },
            {
                "name": "azure-gpt",
                "kind": "api",
                "api": "azure",
                "base_url": az.url,
                "api_key_env": "T_AZ_KEY",
                "deployment": "chat",
                "api_version": "2024-10-21",
                "first_token_timeout_s": 2,
                "headers": {"X-Team": "search", "X-Gateway": {"env": "T_GW"}},
                "prices": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
            },
            {"name": "openai", "kind": "api", "base_url": oa.base_url, "prices": PRICES},
        ]
    )


def _run(coro_fn, monkeypatch, *, claude: dict | None = None, servers: dict | None = None):
    """Run ``coro_fn(client, ant, az, oa)`` against fresh fakes."""
    monkeypatch.setenv("T_ANT_KEY", "ant-test-key")
    monkeypatch.setenv("T_AZ_KEY", "az-test-key")
    monkeypatch.setenv("T_GW", "gw-token-1")

    async def go():
        async with (
            AnthropicServer(api_key="ant-test-key") as ant,
            AzureServer(deployments={"chat": "gpt-4o"}, api_key="az-test-key") as az,
            LoopbackServer() as oa,
            BackendClient(_catalog(ant, az, oa, **(claude or {})), seed=0) as client,
        ):
            return await coro_fn(client, ant, az, oa)

    return asyncio.run(go())


USER = [{"role": "user", "content": "hello there"}]
CACHED_SYSTEM = {
    "role": "system",
    "content": [{"type": "text", "text": "Shared rules " * 10, "cache_control": {"type": "ephemeral"}}],
}


def test_anthropic_answers_streams_and_bills_cached_tokens(monkeypatch):
    async def go(client, ant, az, oa):
        first = await client.chat("claude", {"messages": [CACHED_SYSTEM, *USER]})
        second = await client.chat("claude", {"messages": [CACHED_SYSTEM, *USER]})
        stream = await client.stream(
            "claude", {"messages": [CACHED_SYSTEM, *USER], "stream_options": {"include_usage": True}}
        )
        chunks = [c async for c in stream]
        return first, second, stream.result, chunks, ant.last_headers, ant.last_request

    first, second, streamed, chunks, headers, body = _run(go, monkeypatch)
    want = answer_text(USER)
    assert first.text == second.text == streamed.text == want and first.finish_reason == "stop"
    assert headers["x-api-key"] == "ant-test-key" and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers and body["model"] == "claude-x" and body["max_tokens"] == 64
    prefix = first.cache_write_tokens
    assert (
        prefix > 0 and first.cached_tokens == 0 and second.cached_tokens == prefix == streamed.cached_tokens
    )
    assert first.prompt_tokens == second.prompt_tokens and first.completion_tokens == 13
    uncached = first.prompt_tokens - prefix
    assert first.cost_usd == pytest.approx((uncached * 3.0 + prefix * 3.75 + 13 * 15.0) / 1e6)
    assert second.cost_usd == pytest.approx((uncached * 3.0 + prefix * 0.3 + 13 * 15.0) / 1e6)
    assert streamed.cost_usd == pytest.approx(second.cost_usd) and streamed.usage_source == "upstream"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["prompt_tokens_details"] == {"cached_tokens": prefix}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and {c["model"] for c in chunks} == {"claude"}


def test_an_unset_cached_price_bills_cached_tokens_at_the_input_price(monkeypatch):
    async def go(client, ant, az, oa):
        await client.chat("claude", {"messages": [CACHED_SYSTEM, *USER]})
        return await client.chat("claude", {"messages": [CACHED_SYSTEM, *USER]})

    r = _run(go, monkeypatch, claude={"prices": PRICES})
    assert r.cached_tokens > 0
    assert r.cost_usd == pytest.approx((r.prompt_tokens * 3.0 + r.completion_tokens * 15.0) / 1e6)


def test_tool_use_round_trip_and_stop_reasons(monkeypatch):
    async def go(client, ant, az, oa):
        asked = await client.chat(
            "claude", {"messages": [{"role": "user", "content": "find cats"}], "tools": TOOLS}
        )
        message = asked.raw["choices"][0]["message"]
        call = message["tool_calls"][0]
        answered = await client.chat(
            "claude",
            {
                "tools": TOOLS,
                "messages": [
                    {"role": "user", "content": "find cats"},
                    message,
                    {"role": "tool", "tool_call_id": call["id"], "content": "3 cats"},
                ],
            },
        )
        stream = await client.stream(
            "claude",
            {
                "messages": [{"role": "user", "content": "find cats"}],
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "search"}},
            },
        )
        chunks = [c async for c in stream]
        short = await client.chat("claude", {"messages": USER, "max_tokens": 3})
        stopped = await client.stream("claude", {"messages": USER, "stop": ["deterministic"]})
        stopped_text = "".join(
            [c["choices"][0]["delta"].get("content") or "" async for c in stopped if c["choices"]]
        )
        return asked, call, answered, chunks, short, stopped.result, stopped_text

    asked, call, answered, chunks, short, stopped, stopped_text = _run(go, monkeypatch)
    assert asked.finish_reason == "tool_calls" and call["function"]["name"] == "search"
    assert json.loads(call["function"]["arguments"]) == {"query": "find cats"}
    assert call["id"].startswith("toolu_") and answered.text == "The tool said: 3 cats."
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].get("tool_calls")
    ]
    assert calls[0]["id"].startswith("toolu_") and calls[0]["function"]["name"] == "search"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"query": "find cats"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert stopped.finish_reason == "stop" and "deterministic" not in stopped_text
    assert stopped_text == answer_text(USER).split("deterministic")[0]


def test_azure_gets_its_url_key_and_extra_headers(monkeypatch):
    async def go(client, ant, az, oa):
        r = await client.chat("azure-gpt", {"messages": USER})
        s = await client.stream("azure-gpt", {"messages": USER, "stream_options": {"include_usage": True}})
        chunks = [c async for c in s]
        return r, s.result, chunks, az.last_headers, az.last_request

    r, streamed, chunks, headers, body = _run(go, monkeypatch)
    assert r.text == streamed.text == answer_text(USER) and r.raw["model"] == "gpt-4o"
    assert headers["api-key"] == "az-test-key" and "authorization" not in headers
    assert headers["x-team"] == "search" and headers["x-gateway"] == "gw-token-1"
    assert (
        body["stream_options"] == {"include_usage": True} and chunks[-1]["usage"]["completion_tokens"] == 13
    )


def test_errors_map_and_feed_the_breaker_and_fallback(monkeypatch):
    async def go(client, ant, az, oa):
        out = {}
        ant.set_fault("error503", count=10)  # 529 overloaded: retryable, falls back
        r = await client.chat_with_fallback(["claude", "azure-gpt"], {"messages": USER})
        out["fallback"] = (r.backend, r.tried, r.errors)
        ant.set_fault("ok")
        try:  # a 400 from Anthropic: never retried, never re-routed
            await client.chat_with_fallback(["claude", "azure-gpt"], {"messages": USER, "temperature": 1.5})
        except BadRequest as err:
            out["bad"] = (err.status, err.message, ant.stats["chat"])
        try:  # a request the Messages API has no words for: refused before any call
            await client.chat("claude", {"messages": USER, "n": 2})
        except BadRequest as err:
            out["untranslatable"] = err.message
        monkeypatch.delenv("T_GW")
        try:
            await client.chat("azure-gpt", {"messages": USER}, max_retries=0)
        except BackendError as err:
            out["missing_secret"] = err.message
        monkeypatch.setenv("T_ANT_KEY", "wrong-key")
        try:
            await client.chat("claude", {"messages": USER})
        except BadRequest as err:
            out["auth"] = (err.status, err.message)
        return out

    out = _run(go, monkeypatch)
    backend, tried, errors = out["fallback"]
    assert backend == "azure-gpt" and tried == ["claude", "azure-gpt"] and "HTTP 529: Overloaded" in errors[0]
    status, message, calls = out["bad"]
    assert status == 400 and "temperature" in message and calls >= 1
    assert "'n'" in out["untranslatable"] and "Messages API" in out["untranslatable"]
    assert "T_GW, which is unset" in out["missing_secret"]
    assert (
        out["auth"][0] == 401 and "invalid x-api-key" in out["auth"][1] and "wrong-key" not in out["auth"][1]
    )


def test_a_cut_anthropic_stream_resumes_by_prefill(monkeypatch):
    async def go(client, ant, az, oa):
        second = AnthropicServer(api_key="ant-test-key")
        await second.start()
        try:
            cat = Catalog.from_entries(
                [
                    {
                        "name": "c1",
                        "kind": "api",
                        "api": "anthropic",
                        "base_url": ant.url,
                        "api_key_env": "T_ANT_KEY",
                        "max_tokens": 64,
                        "prices": PRICES,
                    },
                    {
                        "name": "c2",
                        "kind": "api",
                        "api": "anthropic",
                        "base_url": second.url,
                        "api_key_env": "T_ANT_KEY",
                        "max_tokens": 64,
                        "prices": PRICES,
                    },
                ]
            )
            ant.set_fault("cut_stream", after=4, count=1)  # an overloaded_error event after 4 tokens
            async with BackendClient(cat) as c:
                stream = await c.chat_with_fallback(["c1", "c2"], {"messages": USER}, stream=True)
                text = "".join(
                    [ch["choices"][0]["delta"].get("content") or "" async for ch in stream if ch["choices"]]
                )
            return text, stream.result, second.last_request
        finally:
            await second.stop()

    text, result, continued = _run(go, monkeypatch)
    assert text == answer_text(USER) and result.tried == ["c1", "c2"]
    assert "overloaded_error" in result.errors[0]
    prefill = continued["messages"][-1]
    assert prefill["role"] == "assistant" and prefill["content"][0]["text"] == "You said: hello there."
    assert "continue_final_message" not in continued  # vLLM's words never reach the Messages API


def test_all_failed_when_every_provider_is_down(monkeypatch):
    async def go(client, ant, az, oa):
        ant.set_fault("error500")
        az.set_fault("error500")
        with pytest.raises(AllBackendsFailed) as err:
            await client.chat_with_fallback(["claude", "azure-gpt"], {"messages": USER})
        return err.value

    err = _run(go, monkeypatch)
    assert err.status == 500 and len(err.errors) == 2
