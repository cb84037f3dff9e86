"""A minimal, fast OpenAI-compatible server for tests and benchmarks, that misbehaves on request.

Routes: ``POST /v1/chat/completions`` (stream and not), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text, with vLLM-named gauges and a TTFT histogram sum/count),
``GET|POST /fault`` and ``GET|DELETE /arrivals`` (the log of chat requests received: arrival
time in Unix seconds, the fault each met, how it ended; and every fault change). Answers are
deterministic: ``"You said: <the last user message>. " +`` :data:`ANSWER_TAIL` (continuations of
a partial answer get only its rest; a request with ``tools`` gets a tool call in OpenAI's wire
format; see :mod:`tests.fakes.loopback.chat`).

Faults (``--fault`` at start, or ``POST /fault {"mode": ..., "count": N, "duration_s": T, ...}``
at run time) apply to chat requests only: ``ok``, ``error500``, ``error503`` / ``error429`` (with
``Retry-After: retry_after`` when set), ``hang`` (never answers), ``slow`` (``delay_s`` before the
first token and between tokens), ``cut_stream`` (closes the connection after ``after`` tokens; a
non-stream answer is cut mid-body), ``bad_json``. ``count`` limits the fault to the next N chat
requests, ``duration_s`` to the next T seconds. ``--listen-at`` (Unix time) makes a started
process wait before it listens, so a benchmark can bring a killed backend back at a set instant::

    python -m tests.fakes.loopback --port 8201 --fault error429 --retry-after 1
    curl -X POST 127.0.0.1:8201/fault -d '{"mode": "cut_stream", "after": 3, "count": 1}'
    curl 127.0.0.1:8201/arrivals

Run it from the repository root (``tests`` is not installed). Layout:
:mod:`~tests.fakes.loopback.faults` (faults, their window, the arrival log),
:mod:`~tests.fakes.loopback.chat` (answers and the chat route),
:mod:`~tests.fakes.loopback.server` (:class:`LoopbackServer`); this module re-exports them and
holds :class:`LoopbackThread` and the command line (``__main__.py`` runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from tests.fakes.loopback.chat import ANSWER_TAIL, answer_rest, answer_text, tool_call
from tests.fakes.loopback.faults import (
    FAULT_MODES,
    ArrivalLog,
    Fault,
    FaultState,
    fault_window_figures,
)
from tests.fakes.loopback.server import HOST, LoopbackServer

__all__ = [
    "ANSWER_TAIL",
    "FAULT_MODES",
    "HOST",
    "ArrivalLog",
    "Fault",
    "FaultState",
    "LoopbackServer",
    "LoopbackThread",
    "answer_rest",
    "answer_text",
    "fault_window_figures",
    "main",
    "tool_call",
]


class LoopbackThread:
    """A :class:`LoopbackServer` on its own event loop in a daemon thread, for synchronous callers.

    ``with LoopbackThread(fault=...) as srv: ...``; ``srv.server`` is the server (``stats``, ``fault``).
    ``server_cls``: a subclass that speaks another wire format (:mod:`tests.fakes.anthropic_server`,
    :mod:`tests.fakes.azure_server`).
    """

    def __init__(self, server_cls: type[LoopbackServer] = LoopbackServer, **kwargs: Any) -> None:
        self.server = server_cls(**kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def set_fault(self, mode: str = "ok", **params: Any) -> Fault:
        """Switch the server's fault (on its loop); ``params`` as in :class:`Fault`."""
        fault = Fault.from_dict({"mode": mode, **params})
        assert self._loop is not None, "LoopbackThread is not started"
        self._loop.call_soon_threadsafe(self.server.faults.set, fault)
        return fault

    def arrivals(self, timeout: float = 5.0) -> dict[str, Any]:
        """The server's arrival log and fault changes, as ``GET /arrivals`` returns them."""
        assert self._loop is not None, "LoopbackThread is not started"

        async def snap() -> dict[str, Any]:
            return self.server.arrivals.snapshot(self.server.faults)

        return asyncio.run_coroutine_threadsafe(snap(), self._loop).result(timeout)

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
    fields = {"mode": args.fault, "count": args.count, "after": args.after, "retry_after": args.retry_after}
    fault = Fault.from_dict({**fields, "delay_s": args.delay, "duration_s": args.duration})
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = LoopbackServer(
        args.port, fault=fault, model_id=args.model_id, api_key=key, stream_usage=not args.no_stream_usage
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.listen_at is not None:  # imports done: listen at the set instant, not start-up's later one
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, args.listen_at - time.time()))
        if stop.is_set():
            return
    await server.start()
    print(f"loopback listening on {server.url} (pid {os.getpid()})", flush=True)
    gc.collect()
    gc.freeze()  # start-up objects leave the GC's generations: no full-collection stalls mid-benchmark
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakes.loopback", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8200, help="0 picks a free port (printed on start)")
    ap.add_argument("--fault", default="ok", choices=FAULT_MODES)
    ap.add_argument("--count", type=int, default=None, help="the fault hits only the next N chat requests")
    ap.add_argument("--duration", type=float, default=None, help="the fault lasts only this many seconds")
    ap.add_argument("--after", type=int, default=3, help="cut_stream: tokens sent before the cut")
    ap.add_argument("--retry-after", type=float, default=1.0, help="error429/error503: Retry-After seconds")
    ap.add_argument("--delay", type=float, default=0.05, help="slow: seconds before each token")
    ap.add_argument("--model-id", default=None, help="serve only this model id (others get 404)")
    ap.add_argument(
        "--api-key-env", default=None, help="NAME of an env var holding the key clients must send"
    )
    ap.add_argument("--no-stream-usage", action="store_true", help="streams carry no usage chunk")
    ap.add_argument("--listen-at", type=float, default=None, help="Unix time at which to start listening")
    args = ap.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except ValueError as err:
        print(f"loopback: {err}", file=sys.stderr)
        return 2
    return 0
