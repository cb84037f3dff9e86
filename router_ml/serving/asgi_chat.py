"""``POST /v1/chat/completions`` as a plain ASGI handler: the proxy's hot path.

FastAPI's middleware stack, dependency solving and response classes cost about a third of the
proxy's CPU per request; this handler reads the body itself, answers with ``orjson``-encoded bytes
and streams server-sent events directly. The proxy app (:func:`~router_ml.serving.proxy.create_app`)
sends this one route here and everything else through FastAPI. A client that disconnects mid-stream
cancels the upstream stream at once (the request is still booked, with the tokens generated).

A stream's ``router_ml_requests`` count is taken when it ends, by how it ended: ``200`` when it
completed, the status of the error it carries in-band (``502``) when every backend failed
mid-stream, ``499`` when the client went away: a failed stream is never counted as a success
although its HTTP status line, sent with the first token, said 200.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from router_ml.serving.openai_errors import ApiError, parse_body

log = logging.getLogger("router_ml.serving.proxy")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
JSON_TYPE = (b"content-type", b"application/json")
#: the ``status`` label of a stream the client left before its end (nginx's "client closed request")
STATUS_CLIENT_GONE = "499"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers.items()]


async def send_json(send: Send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    data = orjson.dumps(obj)
    head = [JSON_TYPE, (b"content-length", str(len(data)).encode()), *_header_list(headers or {})]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


async def read_body(receive: Receive, max_bytes: int) -> bytes:
    """The request body; a 413 :class:`ApiError` as soon as it grows past ``max_bytes``."""
    parts, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ApiError(400, "the client disconnected before sending the whole body")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body is over {max_bytes} bytes; the limit is {max_bytes}",
                           code="request_too_large")  # fmt: skip
        parts.append(chunk)
        if not msg.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class ChatRoute:
    """The ASGI callable for ``POST /v1/chat/completions`` of one proxy app.

    ``authorize(header)`` raises :class:`ApiError` for a bad ``Authorization`` header and returns
    the request's virtual API key (None without a key store); ``metrics``
    is the app's :class:`~router_ml.serving.proxy.Metrics`; ``settings`` its ``ProxySettings``."""

    def __init__(self, engine: Any, metrics: Any, settings: Any, authorize: Callable[[str], Any]) -> None:
        self.engine, self.metrics, self.settings, self.authorize = engine, metrics, settings, authorize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, settings, key = "unknown", self.settings, None
        try:
            auth, length = "", None
            for k, v in scope["headers"]:
                if k == b"authorization":
                    auth = v.decode("latin-1")
                elif k == b"content-length":
                    length = v.decode("latin-1")
            key = self.authorize(auth)
            if length and length.isdigit() and int(length) > settings.max_body_bytes:
                raise ApiError(413, f"request body is {length} bytes; the limit is {settings.max_body_bytes}",
                               code="request_too_large")  # fmt: skip
            body = parse_body(await read_body(receive, settings.max_body_bytes), settings.max_body_bytes)
            outcome = await self.engine.complete(body, settings.max_prompt_chars, book_later=True, key=key)
        except ApiError as e:
            self.metrics.requests.labels(route, str(e.status)).inc()
            self.metrics.keyed(key, e.status)
            await send_json(send, e.status, e.body(), e.headers)
            return
        except Exception as e:  # pragma: no cover - last resort, never a bare traceback
            log.exception("unexpected error")
            err = ApiError(500, f"internal error: {type(e).__name__}", type="server_error")
            await send_json(send, err.status, err.body())
            return
        if outcome.stream is None:
            self.metrics.requests.labels(outcome.route, "200").inc()
            self.metrics.keyed(key, 200)
            try:
                raw = outcome.result.raw
                raw = dict(raw) if isinstance(raw, dict) else {}
                raw["model"] = outcome.result.backend
                raw["id"] = raw.get("id") or outcome.request_id
                await send_json(send, 200, raw, outcome.headers)
            finally:  # booked once the answer is written out (or the client has gone)
                self.engine.book(outcome)
            return
        await self._stream(outcome, outcome.routed_prompt, receive, send)

    async def _stream(self, outcome: Any, prompt: str, receive: Receive, send: Send) -> None:
        """Server-sent events until ``[DONE]``; a client disconnect cancels the upstream stream."""
        head = [*SSE_HEADERS, *_header_list(outcome.headers)]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        main = asyncio.current_task()
        finished = False

        async def watch() -> None:
            while True:
                if (await receive())["type"] == "http.disconnect":
                    if not finished and main is not None:
                        main.cancel()
                    return

        watcher = asyncio.create_task(watch())
        status = STATUS_CLIENT_GONE  # counted under this unless the stream ends one of the ways below
        try:
            try:
                async for chunk in self.engine.iterate(outcome, prompt):
                    await send({"type": "http.response.body", "body": sse(chunk), "more_body": True})
                status = "200"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every backend failed mid-stream: tell the client in-band
                err = ApiError(502, f"stream failed: {e}", type="api_error", code="backends_failed")
                status = str(err.status)
                await send({"type": "http.response.body", "body": sse(err.body()), "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        except asyncio.CancelledError:
            if not watcher.done() or main is None:
                raise  # cancelled from outside (shutdown), not by a disconnect
            main.uncancel()  # the client went away: engine.iterate booked the request
        finally:
            watcher.cancel()
            self.metrics.requests.labels(outcome.route, status).inc()
            self.metrics.keyed(outcome.key, int(status))
