"""The chat request schema (router_ml.serving.chat_request): what passes, and the OpenAI-style
error (status, ``param``, ``code``, a message naming the field) for what does not."""

from __future__ import annotations

import pytest

from router_ml.serving.chat_request import validate_chat
from router_ml.serving.openai_errors import ApiError

USER = [{"role": "user", "content": "Summarise the meeting notes."}]


def _req(**kw):
    return {"model": "router", "messages": USER} | kw


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "words"),
    [
        ([1, 2], 400, None, None, "must be a JSON object, got list"),
        ({"messages": USER}, 400, "model", None, "'model' is required"),
        (_req(model="  "), 400, "model", None, "'model' must not be blank"),
        (_req(model=3), 400, "model", None, "valid string"),
        ({"model": "router"}, 400, "messages", None, "'messages' is required"),
        (_req(messages=[]), 400, "messages", None, "at least 1 item"),
        (_req(messages=["hi"]), 400, "messages", None, "'messages[0]'"),
        (_req(messages=[{"role": "wizard", "content": "x"}]), 400, "messages", None, "'messages[0].role'"),
        (_req(messages=[{"role": "user", "content": 5}]), 400, "messages", None, "'messages[0].content'"),
        (
            _req(messages=[{"role": "user", "content": [{"type": "text"}]}]),
            400, "messages", None, "'messages[0].content[0].text': Field required",
        ),
        (
            _req(messages=[{"role": "user", "content": [{"text": "x"}]}]),
            400, "messages", None, "content part: an object with a 'type'",
        ),
        (_req(messages=[{"role": "user", "content": ""}]), 400, "messages", None, "no text to answer"),
        (_req(max_tokens="abc"), 400, "max_tokens", None, "valid integer, got 'abc'"),
        (_req(max_tokens=True), 400, "max_tokens", None, "valid integer, got True"),
        (_req(max_completion_tokens=0), 400, "max_completion_tokens", None, "greater than 0"),
        (_req(n=2), 400, "n", None, "only n=1"),
        (_req(stream="yes"), 400, "stream", None, "valid boolean"),
        (_req(temperature=True), 400, "temperature", None, "valid number"),
        (_req(top_p="0.5"), 400, "top_p", None, "valid number"),
        (
            _req(messages=[{"role": "user", "content": "x" * 101}]),
            413, "messages", "context_length_exceeded", "101 characters; the limit is 100",
        ),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(body, status, param, code, words):
    with pytest.raises(ApiError) as info:
        validate_chat(body, max_prompt_chars=100)
    err = info.value
    assert (err.status, err.param, err.code) == (status, param, code), err
    assert words in err.message, err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_valid_requests_give_the_routed_prompt_and_leave_the_body_alone():
    body = {
        "model": "router:utility:0.5",
        "messages": [
            {"role": "system", "content": "You review code."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]},
            {"role": "tool", "content": "result", "tool_call_id": "t1"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Is this"},
                    {"type": "image_url", "image_url": {"url": "u"}},
                    {"type": "text", "text": "safe?"},
                ],
            },
        ],
        "max_tokens": 64,
        "temperature": 0,
        "stream": True,
        "tools": [{"type": "function"}],
        "response_format": {"type": "json_object"},
    }
    before = repr(body)
    req, prompt = validate_chat(body, max_prompt_chars=10_000)
    assert prompt == "You review code.\nIs this\nsafe?"
    assert req["model"] == "router:utility:0.5" and req["stream"] is True and req["max_tokens"] == 64
    assert repr(body) == before  # the body goes on to the backend as it came


def test_the_last_message_is_routed_when_no_user_speaks():
    _, prompt = validate_chat(_req(messages=[{"role": "assistant", "content": "Hello"}]), 100)
    assert prompt == "Hello"
