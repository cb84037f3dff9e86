"""The loopback server itself: an asyncio HTTP/1.1 server with the OpenAI routes and admin routes.

Pure asyncio (``asyncio.start_server`` and a small HTTP/1.1 parser), no web framework: it is the
backend that benchmarks put behind a proxy, so its own cost per request must be far below the
proxy's; uvicorn + starlette would add their ASGI plumbing to every request and blur the figure.
HTTP/1.1 keep-alive, JSON bodies with Content-Length (``Expect: 100-continue`` honoured), SSE
streams with chunked transfer encoding. It binds 127.0.0.1 only. The chat route lives in
:mod:`tests.fakes.loopback.chat`, the faults and the arrival log in
:mod:`tests.fakes.loopback.faults`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.fakes.loopback.chat import error, response, serve_chat
from tests.fakes.loopback.faults import FAULT_MODES, ArrivalLog, Fault, FaultState

HOST = "127.0.0.1"
_ROUTES = {"/v1/chat/completions": "POST", "/health": "GET", "/v1/models": "GET", "/metrics": "GET"}


class LoopbackServer:
    """The server on the running event loop: ``async with LoopbackServer() as srv: srv.base_url``.

    ``port`` 0 picks a free port; ``model_id`` (if set) is the only model served (others get 404);
    ``api_key`` (if set) must come as ``Authorization: Bearer <key>`` (else 401);
    ``stream_usage`` False drops the usage chunk from streams (as llama.cpp's server does);
    ``clock`` (Unix seconds) times fault windows and the arrival log (injectable for tests).
    ``stats`` counts ``connections``, ``requests``, ``chat`` and ``fault:<mode>``; ``arrivals``
    logs every chat request (``GET /arrivals``, cleared by ``DELETE /arrivals``); ``faults``
    holds the current fault and its changes (``GET|POST /fault``).
    """

    def __init__(
        self,
        port: int = 0,
        *,
        fault: Fault | None = None,
        model_id: str | None = None,
        api_key: str | None = None,
        stream_usage: bool = True,
        max_body_bytes: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.port = port
        self.faults = FaultState(fault, clock)
        self.arrivals = ArrivalLog(clock)
        self.model_id = model_id
        self.api_key = api_key
        self.stream_usage = stream_usage
        self.max_body_bytes = max_body_bytes
        self.stats: Counter[str] = Counter()
        self.last_request: dict[str, Any] | None = None  # the last chat body, for tests
        self.last_headers: dict[str, str] = {}  # the last chat request's headers (lower-case names)
        self.stream_preamble: list[dict[str, Any]] = []  # events sent before a stream's first chunk
        self.running = 0  # chat requests being answered
        self.ttft = [0.0, 0]  # server-side time to first token: sum, count
        self._ids = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def fault(self) -> Fault:
        """The fault in force now."""
        return self.faults.current()

    @fault.setter
    def fault(self, fault: Fault) -> None:
        self.faults.set(fault)

    def set_fault(self, mode: str = "ok", **params: Any) -> Fault:
        """Switch to a validated fault now; ``params`` as in :class:`Fault`."""
        return self.faults.set(Fault.from_dict({"mode": mode, **params}))

    def new_id(self) -> str:
        self._ids += 1
        return f"chatcmpl-loopback-{self._ids}"

    async def start(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._handle, HOST, self.port, limit=65536, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self.arrivals.started_at = self.arrivals.clock()
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> LoopbackServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------------------ HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        self.stats["connections"] += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(error(431, "request headers too large", "invalid_request_error"))
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    writer.write(error(400, "malformed request line", "invalid_request_error"))
                    return
                method, path, _ = parts
                headers = {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                if "transfer-encoding" in headers:
                    writer.write(
                        error(411, "chunked request bodies are not supported", "invalid_request_error")
                    )
                    return
                try:
                    length = int(headers.get("content-length") or 0)
                except ValueError:
                    writer.write(error(400, "bad Content-Length", "invalid_request_error"))
                    return
                if length > self.max_body_bytes:
                    writer.write(
                        error(413, f"body over {self.max_body_bytes} bytes", "invalid_request_error")
                    )
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await reader.readexactly(length) if length else b""
                self.stats["requests"] += 1
                path, _, query = path.partition("?")
                keep = await self._dispatch(method, path, headers, body, reader, writer, query)
                await writer.drain()
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # stop(): end quietly (3.11's stream callback logs cancelled handlers)
            return
        finally:
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        query: str = "",
    ) -> bool:
        """Answer one request (``query``: the target's query string); False closes the connection."""
        if path in ("/fault", "/arrivals"):
            writer.write(self._admin(method, path, body))
            return True
        if path not in _ROUTES:
            writer.write(error(404, f"no route {path!r}", "not_found_error"))
            return True
        if method != _ROUTES[path]:
            writer.write(error(405, f"{path} takes {_ROUTES[path]}", "invalid_request_error"))
            return True
        if path == "/health":
            writer.write(response(200, b'{"status":"ok"}'))
        elif path == "/v1/models":
            data = [
                {"id": self.model_id or "loopback", "object": "model", "created": 0, "owned_by": "router-ml"}
            ]
            writer.write(response(200, json.dumps({"object": "list", "data": data}).encode()))
        elif path == "/metrics":
            writer.write(response(200, self._metrics().encode(), ctype="text/plain; version=0.0.4"))
        else:
            return await serve_chat(self, headers, body, reader, writer)
        return True

    def _admin(self, method: str, path: str, body: bytes) -> bytes:
        """``GET|POST /fault`` (read / set the fault), ``GET|DELETE /arrivals`` (read / clear the log)."""
        allowed = ("GET", "POST") if path == "/fault" else ("GET", "DELETE")
        if method not in allowed:
            return error(405, f"{path} takes {' or '.join(allowed)}", "invalid_request_error")
        if path == "/arrivals":
            if method == "DELETE":
                self.arrivals.clear()
            return response(200, json.dumps(self.arrivals.snapshot(self.faults)).encode())
        if method == "POST":
            try:
                self.faults.set(Fault.from_dict(json.loads(body or b"{}")))
            except (ValueError, TypeError) as err:
                return error(400, str(err), "invalid_request_error")
        return response(200, json.dumps(dataclasses.asdict(self.fault)).encode())

    def _metrics(self) -> str:
        label = f'{{model_name="{self.model_id or "loopback"}"}}'
        lines = [
            f"loopback_requests_total {self.stats['requests']}",
            f"loopback_chat_requests_total {self.stats['chat']}",
            *(f'loopback_faults_total{{mode="{m}"}} {self.stats["fault:" + m]}' for m in FAULT_MODES[1:]),
            f"vllm:num_requests_running{label} {self.running}",
            f"vllm:num_requests_waiting{label} 0",
            f"vllm:kv_cache_usage_perc{label} 0.0",
            f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",{label[1:-1]}}} {self.ttft[1]}',
            f"vllm:time_to_first_token_seconds_sum{label} {self.ttft[0]}",
            f"vllm:time_to_first_token_seconds_count{label} {self.ttft[1]}",
        ]
        return "\n".join(lines) + "\n"
