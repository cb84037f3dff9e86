"""OpenAI-style request validation and error bodies for the proxy.

Every malformed request is rejected with a 4xx before any backend is called: a body that is not a
JSON object, no or empty ``messages``, a bad role or content, a non-positive or non-integer
``max_tokens``, a non-boolean ``stream``, an oversized body. Errors look like OpenAI's::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": "invalid_request"}}

Every error body carries a ``code``: the one its raiser gave, else the default of its status
(:data:`DEFAULT_CODES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

ROLES = ("system", "user", "assistant", "tool", "developer")
# the ``code`` of an error body whose raiser named none
DEFAULT_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "backends_failed",
    503: "service_unavailable",
    504: "backend_timeout",
}


@dataclass
class ApiError(Exception):
    """An error the proxy answers with (status, OpenAI-style body); never a bare 500."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # e.g. retry-after

    def body(self) -> dict[str, Any]:
        code = self.code or DEFAULT_CODES.get(self.status, "error")
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": code}}

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def parse_body(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """The JSON object of a request body, or an :class:`ApiError` naming what is wrong."""
    if len(raw) > max_bytes:
        raise ApiError(
            413, f"request body is {len(raw)} bytes; the limit is {max_bytes}", code="request_too_large"
        )
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise ApiError(400, f"{where}.content[{k}] must be an object with a 'type'", param=where)
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}.content[{k}].text must be a string", param=where)
                parts.append(part["text"])
        return "\n".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"{where}.content must be a string or a list of content parts", param=where)


def validate_chat(body: dict[str, Any], max_prompt_chars: int) -> tuple[str, list[dict[str, Any]]]:
    """Check a chat-completions request; returns (model, messages).

    The routed prompt is built from the messages by :func:`prompt_of`."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ApiError(
            400, "'model' is required: a backend name, 'router' or 'router:<policy>:<knob>'", param="model"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    total = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where} must be an object", param="messages")
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {list(ROLES)}, got {role!r}", param="messages")
        total += len(_text_of(msg.get("content"), where))
    if total > max_prompt_chars:
        raise ApiError(
            413,
            f"the messages hold {total} characters; the limit is {max_prompt_chars}",
            param="messages",
            code="context_length_exceeded",
        )
    if not prompt_of(messages).strip():
        raise ApiError(400, "the messages carry no text to answer", param="messages")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        if key in body and body[key] is not None:
            v = body[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ApiError(400, f"'{key}' must be a positive integer, got {v!r}", param=key)
    if "n" in body and body["n"] not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(400, f"'stream' must be a boolean, got {body['stream']!r}", param="stream")
    for key in ("temperature", "top_p"):
        if (
            key in body
            and body[key] is not None
            and (isinstance(body[key], bool) or not isinstance(body[key], (int, float)))
        ):
            raise ApiError(400, f"'{key}' must be a number", param=key)
    return model, messages


def prompt_of(messages: list[dict[str, Any]]) -> str:
    """The text the router classifies: the last user message (with the system prompt before it, which
    often says what the task is)."""
    system = [
        _text_of(m.get("content"), "system") for m in messages if m.get("role") in ("system", "developer")
    ]
    users = [m for m in messages if m.get("role") == "user"]
    last = (
        _text_of(users[-1].get("content"), "user") if users else _text_of(messages[-1].get("content"), "last")
    )
    return "\n".join([*system[:1], last]).strip()
