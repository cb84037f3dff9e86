"""OpenAI-style error bodies for the proxy, and the parse of a request body's bytes.

Every malformed request is rejected with a 4xx before any backend is called: an oversized body or
one that is not JSON here, the rest by the request schema (:mod:`~router_ml.serving.chat_request`).
Errors look like OpenAI's::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": "invalid_request"}}

Every error body carries a ``code``: the one its raiser gave, else the default of its status
(:data:`DEFAULT_CODES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

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


def parse_body(raw: bytes, max_bytes: int) -> Any:
    """The JSON value of a request body (:func:`~router_ml.serving.chat_request.validate_chat`
    checks it is a request), or an :class:`ApiError` naming what is wrong."""
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
    return body
