"""OpenAI-style error bodies for the proxy, and the parse of a request body's bytes.

Every malformed request is rejected with a 4xx before any backend is called: an oversized body or
one that is not JSON here, the rest by the request schema (:mod:`~router_ml.serving.chat_request`).
Errors look like OpenAI's::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass
class ApiError(Exception):
    """An error the proxy answers with (status, OpenAI-style body); never a bare 500."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

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
