"""A minimal, fast OpenAI-compatible server for tests and benchmarks, that misbehaves on request.

Pure asyncio (``asyncio.start_server`` and a small HTTP/1.1 parser), no web framework: it is the
backend that benchmarks put behind a proxy, so its own cost per request must be far below the
proxy's; uvicorn + starlette would add their ASGI plumbing to every request and blur the figure.
HTTP/1.1 keep-alive, JSON bodies with Content-Length (``Expect: 100-continue`` honoured), SSE
streams with chunked transfer encoding. It binds 127.0.0.1 only.

Routes: ``POST /v1/chat/completions`` (stream and not), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text, with vLLM-named gauges and a TTFT histogram sum/count),
``GET|POST /fault``. Answers are deterministic: ``"You said: <the last user message>. " +``
:data:`ANSWER_TAIL`, one whitespace-led word per token. A conversation that ends in an assistant
message with ``continue_final_message: true`` (vLLM's prefill), or in a user message starting
"Continue" right after an assistant message, gets only the rest of that answer, as a model that
continues its partial answer would.

Faults (``--fault`` at start, or ``POST /fault {"mode": ..., "count": N, ...}`` at run time) apply
to chat requests only: ``ok``, ``error500``, ``error503`` / ``error429`` (with ``Retry-After:
retry_after`` when set), ``hang`` (never answers), ``slow`` (``delay_s`` before the first token and
between tokens), ``cut_stream`` (closes the connection after ``after`` tokens; a non-stream answer
is cut mid-body), ``bad_json``. ``count`` limits the fault to the next N chat requests::

    python -m router_ml.serving.loopback --port 8201 --fault error429 --retry-after 1
    curl -X POST 127.0.0.1:8201/fault -d '{"mode": "cut_stream", "after": 3, "count": 1}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FAULT_MODES = ("ok", "error500", "error503", "error429", "hang", "slow", "cut_stream", "bad_json")
ANSWER_TAIL = "This deterministic answer comes from the router-ml loopback server."
HOST = "127.0.0.1"
_TOKEN = re.compile(r"\s*\S+")
_REASON = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Fault:
    """How the server misbehaves; ``count`` None = until changed, N = the next N chat requests."""

    mode: str = "ok"
    count: int | None = None
    after: int = 3
    retry_after: float | None = 1.0
    delay_s: float = 0.05

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fault:
        """Validated; a ValueError names the bad field."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"fault: unknown field(s) {unknown}; allowed: {names}")
        fault = cls(**d)
        if fault.mode not in FAULT_MODES:
            raise ValueError(f"fault: field 'mode' = {fault.mode!r} must be one of {list(FAULT_MODES)}")
        for name, lo in (("count", 1), ("after", 0)):
            v = getattr(fault, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise ValueError(f"fault: field {name!r} = {v!r} must be an integer >= {lo}")
        for name in ("retry_after", "delay_s"):
            v = getattr(fault, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"fault: field {name!r} = {v!r} must be a number >= 0")
        return fault


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, Mapping) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def _role(message: Any) -> str | None:
    return message.get("role") if isinstance(message, Mapping) else None


def answer_text(messages: Sequence[Any]) -> str:
    """The full deterministic answer to a conversation (an echo of its last user message)."""
    user = next((_text(m) for m in reversed(messages) if _role(m) == "user"), "")
    words = user.split()[:16]
    return f"You said: {' '.join(words)}. {ANSWER_TAIL}" if words else ANSWER_TAIL


def answer_rest(messages: Sequence[Any], continue_final: bool) -> str:
    """What the server emits: the answer, or its remainder when the request continues a partial one."""
    if messages and _role(messages[-1]) == "assistant" and continue_final:
        prefix, full = _text(messages[-1]), answer_text(messages[:-1])
    elif (
        len(messages) >= 2
        and _role(messages[-1]) == "user"
        and _text(messages[-1]).lower().startswith("continue")
        and _role(messages[-2]) == "assistant"
    ):
        prefix, full = _text(messages[-2]), answer_text(messages[:-2])
    else:
        return answer_text(messages)
    return full[len(prefix) :] if full.startswith(prefix) else full


def _response(status: int, body: bytes, ctype: str = "application/json", headers: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASON.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    )
    return head.encode() + body


def _error(status: int, message: str, etype: str, code: str | None = None, headers: str = "") -> bytes:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code or status}}
    return _response(status, json.dumps(body).encode(), headers=headers)


def _event(obj: Any) -> bytes:
    data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode())
    data += b"\n\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


class LoopbackServer:
    """The server on the running event loop: ``async with LoopbackServer() as srv: srv.base_url``.

    ``port`` 0 picks a free port; ``model_id`` (if set) is the only model served (others get 404);
    ``api_key`` (if set) must come as ``Authorization: Bearer <key>`` (else 401);
    ``stream_usage`` False drops the usage chunk from streams (as llama.cpp's server does).
    ``stats`` counts ``connections``, ``requests``, ``chat`` and ``fault:<mode>``.
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
    ) -> None:
        self.port = port
        self.fault = fault or Fault()
        self.model_id = model_id
        self.api_key = api_key
        self.stream_usage = stream_usage
        self.max_body_bytes = max_body_bytes
        self.stats: Counter[str] = Counter()
        self.last_request: dict[str, Any] | None = None  # the last chat body, for tests
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self._running = 0
        self._ttft = [0.0, 0]  # server-side time to first token: sum, count
        self._ids = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def set_fault(self, mode: str = "ok", **params: Any) -> Fault:
        self.fault = Fault.from_dict({"mode": mode, **params})
        return self.fault

    async def start(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._handle, HOST, self.port, limit=65536, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
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
                    writer.write(_error(431, "request headers too large", "invalid_request_error"))
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    writer.write(_error(400, "malformed request line", "invalid_request_error"))
                    return
                method, path, _ = parts
                headers = {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                if "transfer-encoding" in headers:
                    writer.write(
                        _error(411, "chunked request bodies are not supported", "invalid_request_error")
                    )
                    return
                try:
                    length = int(headers.get("content-length") or 0)
                except ValueError:
                    writer.write(_error(400, "bad Content-Length", "invalid_request_error"))
                    return
                if length > self.max_body_bytes:
                    writer.write(
                        _error(413, f"body over {self.max_body_bytes} bytes", "invalid_request_error")
                    )
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await reader.readexactly(length) if length else b""
                self.stats["requests"] += 1
                keep = await self._dispatch(method, path.split("?", 1)[0], headers, body, reader, writer)
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
    ) -> bool:
        """Answer one request; False closes the connection."""
        routes = {"/v1/chat/completions": "POST", "/health": "GET", "/v1/models": "GET", "/metrics": "GET"}
        if path == "/fault":
            if method == "POST":
                try:
                    self.fault = Fault.from_dict(json.loads(body or b"{}"))
                except (ValueError, TypeError) as err:
                    writer.write(_error(400, str(err), "invalid_request_error"))
                    return True
            writer.write(_response(200, json.dumps(dataclasses.asdict(self.fault)).encode()))
            return True
        if path not in routes:
            writer.write(_error(404, f"no route {path!r}", "not_found_error"))
            return True
        if method != routes[path]:
            writer.write(_error(405, f"{path} takes {routes[path]}", "invalid_request_error"))
            return True
        if path == "/health":
            writer.write(_response(200, b'{"status":"ok"}'))
        elif path == "/v1/models":
            data = [
                {"id": self.model_id or "loopback", "object": "model", "created": 0, "owned_by": "router-ml"}
            ]
            writer.write(_response(200, json.dumps({"object": "list", "data": data}).encode()))
        elif path == "/metrics":
            writer.write(_response(200, self._metrics().encode(), ctype="text/plain; version=0.0.4"))
        else:
            return await self._chat(headers, body, reader, writer)
        return True

    def _metrics(self) -> str:
        label = f'{{model_name="{self.model_id or "loopback"}"}}'
        lines = [
            f"loopback_requests_total {self.stats['requests']}",
            f"loopback_chat_requests_total {self.stats['chat']}",
            *(f'loopback_faults_total{{mode="{m}"}} {self.stats["fault:" + m]}' for m in FAULT_MODES[1:]),
            f"vllm:num_requests_running{label} {self._running}",
            f"vllm:num_requests_waiting{label} 0",
            f"vllm:kv_cache_usage_perc{label} 0.0",
            f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",{label[1:-1]}}} {self._ttft[1]}',
            f"vllm:time_to_first_token_seconds_sum{label} {self._ttft[0]}",
            f"vllm:time_to_first_token_seconds_count{label} {self._ttft[1]}",
        ]
        return "\n".join(lines) + "\n"

    def _take_fault(self) -> Fault:
        fault = self.fault
        if fault.mode != "ok":
            self.stats["fault:" + fault.mode] += 1
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.fault = Fault()
        return fault

    async def _chat(
        self, headers: dict[str, str], body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        t0 = time.perf_counter()
        self.stats["chat"] += 1
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            writer.write(_error(401, "invalid or missing API key", "authentication_error", "invalid_api_key"))
            return True
        try:
            req = json.loads(body)
        except ValueError:
            writer.write(_error(400, "request body is not valid JSON", "invalid_request_error"))
            return True
        messages = req.get("messages") if isinstance(req, dict) else None
        if not isinstance(messages, list) or not messages or not all(_role(m) for m in messages):
            writer.write(
                _error(400, "'messages' must be a non-empty list of messages", "invalid_request_error")
            )
            return True
        model = req.get("model")
        if self.model_id is not None and model != self.model_id:
            msg = f"The model {model!r} does not exist; this server serves {self.model_id!r}"
            writer.write(_error(404, msg, "invalid_request_error", "model_not_found"))
            return True
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            writer.write(_error(400, "'max_tokens' must be a positive integer", "invalid_request_error"))
            return True
        self.last_request = req
        fault = self._take_fault()
        mode = fault.mode
        if mode in ("error500", "error503", "error429"):
            status = int(mode[5:])
            extra = (
                f"Retry-After: {fault.retry_after:g}\r\n"
                if fault.retry_after is not None and status != 500
                else ""
            )
            writer.write(_error(status, f"injected fault {mode}", "server_error", headers=extra))
            return True
        if mode == "hang":  # never answer; return when the client gives up
            while await reader.read(65536):
                pass
            return False
        pieces = _TOKEN.findall(answer_rest(messages, bool(req.get("continue_final_message"))))
        finish = "stop"
        if max_tokens is not None and len(pieces) > max_tokens:
            pieces, finish = pieces[:max_tokens], "length"
        usage = {
            "prompt_tokens": sum(len(_text(m).split()) + 1 for m in messages),
            "completion_tokens": len(pieces),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._ids += 1
        cid, created, model = f"chatcmpl-loopback-{self._ids}", int(time.time()), model or "loopback"
        self._running += 1
        try:
            if req.get("stream"):
                opts = req.get("stream_options") or {}
                want_usage = self.stream_usage and isinstance(opts, dict) and bool(opts.get("include_usage"))
                return await self._stream(
                    writer, fault, pieces, finish, usage if want_usage else None, (cid, created, model), t0
                )
            if mode == "slow":
                await asyncio.sleep(fault.delay_s * (1 + len(pieces)))
            self._ttft[0] += time.perf_counter() - t0
            self._ttft[1] += 1
            if mode == "bad_json":
                writer.write(_response(200, b'{"id": "chatcmpl-broken", "choices": ['))
                return True
            out = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
            data = _response(200, json.dumps(out).encode())
            if mode == "cut_stream":  # the whole header, half of the body, then the connection closes
                writer.write(data[: len(data) - len(data) // 4])
                return False
            writer.write(data)
            return True
        finally:
            self._running -= 1

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        fault: Fault,
        pieces: list[str],
        finish: str,
        usage: dict[str, int] | None,
        ident: tuple[str, int, str],
        t0: float,
    ) -> bool:
        cid, created, model = ident
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        # every chunk shares its envelope: format it once, json-encode only the delta (fast path)
        head = (
            f'{{"id":{json.dumps(cid)},"object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(model)},"choices":[{{"index":0,"delta":'
        )

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            tail = f',"logprobs":null,"finish_reason":{json.dumps(finish_reason)}}}]}}'
            return _event((head + json.dumps(delta, separators=(",", ":")) + tail).encode())

        mode, delay = fault.mode, fault.delay_s if fault.mode == "slow" else 0.0
        writer.write(chunk({"role": "assistant", "content": ""}))
        if mode == "bad_json":
            writer.write(_event(b'{"id": "chatcmpl-broken", "choices": [{"delta": {"content": "x"'))
            writer.write(b"0\r\n\r\n")
            return True
        cut_at = min(fault.after, max(len(pieces) - 1, 0)) if mode == "cut_stream" else -1
        if not delay and cut_at < 0:  # all tokens at once, one write
            writer.write(b"".join(chunk({"content": piece}) for piece in pieces))
            pieces = []
            self._ttft[0] += time.perf_counter() - t0
            self._ttft[1] += 1
        for i, piece in enumerate(pieces):
            if i == cut_at:
                await writer.drain()
                return False  # the caller closes the connection mid-stream
            if delay:
                await writer.drain()
                await asyncio.sleep(delay)
            writer.write(chunk({"content": piece}))
            if i == 0:
                self._ttft[0] += time.perf_counter() - t0
                self._ttft[1] += 1
        writer.write(chunk({}, finish))
        if usage is not None:
            writer.write(
                _event(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        writer.write(_event(b"[DONE]") + b"0\r\n\r\n")
        return True


class LoopbackThread:
    """A :class:`LoopbackServer` on its own event loop in a daemon thread, for synchronous callers.

    ``with LoopbackThread(fault=...) as srv: ...``; ``srv.server`` is the server (``stats``, ``fault``).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.server = LoopbackServer(**kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def port(self) -> int:
        return self.server.port

    def set_fault(self, mode: str = "ok", **params: Any) -> Fault:
        fault = Fault.from_dict({"mode": mode, **params})
        assert self._loop is not None, "LoopbackThread is not started"
        self._loop.call_soon_threadsafe(setattr, self.server, "fault", fault)
        return fault

    def start(self) -> LoopbackThread:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as err:  # reported to the starting thread
                failure.append(err)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.server.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"loopback-{self.server.port}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = self._thread = None

    def __enter__(self) -> LoopbackThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve(args: argparse.Namespace) -> None:
    fault = Fault.from_dict(
        {
            "mode": args.fault,
            "count": args.count,
            "after": args.after,
            "retry_after": args.retry_after,
            "delay_s": args.delay,
        }
    )
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = LoopbackServer(
        args.port, fault=fault, model_id=args.model_id, api_key=key, stream_usage=not args.no_stream_usage
    )
    await server.start()
    print(f"loopback listening on {server.url} (pid {os.getpid()})", flush=True)
    gc.collect()
    gc.freeze()  # start-up objects leave the GC's generations: no full-collection stalls mid-benchmark
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m router_ml.serving.loopback", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--port", type=int, default=8200, help="0 picks a free port (printed on start)")
    ap.add_argument("--fault", default="ok", choices=FAULT_MODES)
    ap.add_argument("--count", type=int, default=None, help="the fault hits only the next N chat requests")
    ap.add_argument("--after", type=int, default=3, help="cut_stream: tokens sent before the cut")
    ap.add_argument("--retry-after", type=float, default=1.0, help="error429/error503: Retry-After seconds")
    ap.add_argument("--delay", type=float, default=0.05, help="slow: seconds before each token")
    ap.add_argument("--model-id", default=None, help="serve only this model id (others get 404)")
    ap.add_argument(
        "--api-key-env", default=None, help="NAME of an env var holding the key clients must send"
    )
    ap.add_argument("--no-stream-usage", action="store_true", help="streams carry no usage chunk")
    args = ap.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except ValueError as err:
        print(f"loopback: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
