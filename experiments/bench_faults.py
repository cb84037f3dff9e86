"""Fault-injection benchmark: router-ml's proxy vs LiteLLM's proxy, one backend misbehaving (issue 4).

    python -m experiments.bench_faults                        # trains a small router if needed
    python -m experiments.bench_faults --duration 12 --onset 2 --fault-end 5 --modes error500 hang

Two loopback backends ``A`` and ``B`` (subprocesses, stopped by PID). router-ml serves both, with
a router model aliased to each; ``model="router:utility:<big lam>"`` picks the cheap ``A`` with
fallback chain ``[A, B]``. LiteLLM serves ``A`` and ``B`` with fallbacks ``A -> B``. Both rest a
failing backend alike: router-ml's breaker opens on the 3rd consecutive failure for 5 s, then lets
one trial through; LiteLLM cools a deployment down for ``cooldown_time: 5`` when its failures
EXCEED ``allowed_fails: 2`` (its default, 3, is ignored in favour of a policy that never cools a
lone deployment down). Same whole-request timeout; router-ml adds its first-token deadline.

Per mode an open loop sends ``rate`` req/s for ``duration`` s (streams for ``cut_stream``). ``A``
misbehaves in ``[onset, fault_end)``, then is healthy: the loopback fault carries ``duration_s``
(A ends it itself and logs both instants); ``killed``: SIGKILL at onset, and a new process,
started at once with ``--listen-at``, listens again at fault_end. A request succeeds only with
HTTP 200 and the loopback's full answer (streams: a ``[DONE]`` and no error event). From the
client: success share, errors seen, p50/p99 of requests sent during the fault, onset to the first
success from ``B``. From the BACKEND (proxy-agnostic): A logs each chat request's arrival
(``GET /arrivals``); for ``killed`` the connection attempts (TCP SYNs to A's port) are seen on a
raw socket (needs CAP_NET_RAW, else n/a). By
:func:`~tests.fakes.loopback.faults.fault_window_figures`:

- ``attempts_on_A_during_fault``: requests (``killed``: connection attempts) A got in the window;
- ``dropped_after_s``: onset to the first attempt in the window followed by ``--quiet`` (1 s) with
  no attempt on A (the quiet may run past fault_end); 0 if none came; ``never`` if attempts never
  paused that long. One definition for every mode: for ``hang`` / ``slow`` router-ml's failures
  are its first-token deadline expiring, LiteLLM's its timeout (a slow answer is no failure);
- ``back_after_s``: fault_end to the arrival of the first request A answers in full, fault-free;
  ``back_for_good_s``: the same after A's last quiet time (a proxy may rest A after fault_end, for
  failures it saw late: LiteLLM's 3 s timeouts of requests hung during the fault).

A table goes to stdout, JSON (with A's arrival log per run) to ``outputs/bench/faults.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from experiments.bench_servers import (
    MASTER_KEY,
    ROOT,
    Proc,
    ensure_checkpoint,
    ensure_litellm,
    litellm_proc,
    stopping,
    wait_ready,
)
from router_ml.backends.local.launch_spec import free_port
from tests.fakes.loopback import answer_text, fault_window_figures

MODES = ("error500", "error503", "error429", "killed", "hang", "slow", "cut_stream")
ROUTED = "router:utility:1000000"  # a huge lam: the cheapest model (A) first, B as its fallback
A_MODEL, B_MODEL = "gpt-4o-mini", "gpt-4o"  # router models aliased to A and B


def fault_body(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /fault`` body for ``mode``, lasting until ``fault_end`` (``killed`` is no loopback fault)."""
    body: dict[str, Any] = {"mode": mode, "duration_s": args.fault_end - args.onset}
    if mode == "error429":
        body["retry_after"] = args.retry_after
    elif mode == "error503":
        body["retry_after"] = None
    elif mode == "slow":
        body["delay_s"] = args.slow_delay
    elif mode == "cut_stream":
        body["after"] = 3
    return body


def start_loopback(name: str, port: int, tmp: Path, listen_at: float | None = None) -> Proc:
    """Loopback ``name`` on ``port``; waited for unless it is to listen only at ``listen_at`` (Unix s)."""
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tests.fakes.loopback", "--port", str(port), "--model-id", name]
    if listen_at is not None:
        cmd += ["--listen-at", repr(listen_at)]
    proc = Proc(name, cmd, f"{url}/health", tmp / f"loopback-{name}-{time.monotonic_ns()}.log")
    if listen_at is None:
        proc.wait_ready(30)
    return proc


class SynCounter:
    """Times (Unix s) of connection attempts (TCP SYNs) to a local port, seen on a raw socket.

    What a killed backend would have logged: every attempt to reach it needs a new connection.
    ``available`` is False without CAP_NET_RAW.
    """

    def __init__(self, port: int) -> None:
        self.port, self.times = port, []
        self._stop = threading.Event()
        try:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        except OSError:
            self._sock = None
            return
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        return self._sock is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pkt = self._sock.recv(65535)
            except TimeoutError:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            flags = pkt[ihl + 13]
            if (
                int.from_bytes(pkt[ihl + 2 : ihl + 4], "big") == self.port
                and flags & 0x02
                and not flags & 0x10
            ):
                self.times.append(time.time())

    def close(self) -> None:
        if self._sock is not None:
            self._stop.set()
            self._thread.join()
            self._sock.close()


def start_proxies(
    ckpt: Path, tmp: Path, litellm: Path | None, ports: dict[str, int], procs: dict[str, Proc], args
) -> dict[str, dict]:
    """router-ml (catalog A, B) and LiteLLM (A -> B) into ``procs``; each proxy's call."""
    rp, llp = free_port(), free_port()
    catalog = tmp / "catalog.yaml"
    entries = []
    for name, price in (("A", 0.1), ("B", 10.0)):
        entries.append(
            f"  - name: {name}\n    kind: vllm\n    base_url: http://127.0.0.1:{ports[name]}/v1\n"
            f"    served_model_id: {name}\n    first_token_timeout_s: {args.first_token_timeout}\n"
            f"    timeout_s: {args.timeout}\n"
            f"    prices: {{gpu_hour_usd: {price}, decode_tokens_per_s: 250}}\n"
            "    latency: {ttft_s: 0.01, tokens_per_s: 1000}\n    context_window: 8192\n"
        )
    catalog.write_text("backends:\n" + "".join(entries))
    py = sys.executable
    rml = [py, "-m", "router_ml.cli", "serve", "--ckpt", str(ckpt), "--backends", str(catalog)]
    rml += ["--port", str(rp), "--ledger", "memory", "--routing-log", ""]
    rml += ["--alias", f"{A_MODEL}=A", "--alias", f"{B_MODEL}=B"]
    procs["router-ml"] = Proc("router-ml", rml, f"http://127.0.0.1:{rp}/health", tmp / "router-ml.log")
    if litellm is not None:
        models = "".join(
            f"  - model_name: {n}\n    litellm_params:\n      model: openai/{n}\n"
            f"      api_base: http://127.0.0.1:{ports[n]}/v1\n      api_key: unused\n"
            f"      timeout: {args.timeout}\n      stream_timeout: {args.timeout}\n"
            for n in ("A", "B")
        )
        settings = (  # LiteLLM cools down when failures EXCEED allowed_fails: the 3rd, as router-ml
            f'  num_retries: {args.litellm_retries}\n  fallbacks: [{{"A": ["B"]}}]\n'
            f"  allowed_fails: 2\n  cooldown_time: {args.cooldown}\n"
            f"  timeout: {args.timeout}\n"
        )
        procs["litellm"] = litellm_proc(litellm, models, settings, llp, tmp)
    wait_ready(procs)
    calls = {
        "router-ml": {"url": f"http://127.0.0.1:{rp}/v1/chat/completions", "model": ROUTED, "headers": {}}
    }
    if "litellm" in procs:
        calls["litellm"] = {
            "url": f"http://127.0.0.1:{llp}/v1/chat/completions",
            "model": "A",
            "headers": {"authorization": f"Bearer {MASTER_KEY}"},
        }
    return calls


def served_by_b(model: str | None, headers: httpx.Headers, b_port: int) -> bool:
    """Whether an answer came from B: the response's model or LiteLLM's api-base header says so."""
    if model in ("B", B_MODEL):
        return True
    if f":{b_port}" in headers.get("x-litellm-model-api-base", ""):
        return True
    return bool(headers.get("x-router-fallback-errors"))


async def one_request(http: httpx.AsyncClient, call: dict, marker: str, stream: bool, b_port: int) -> dict:
    """One call; ``{"ok", "error", "latency_s", "by_b"}`` (never raises)."""
    messages = [{"role": "user", "content": f"hi {marker} ok"}]
    body: dict[str, Any] = {"model": call["model"], "messages": messages, "max_tokens": 64}
    expect = answer_text(messages)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"ok": False, "error": None, "latency_s": None, "by_b": False}
    try:
        if not stream:
            r = await http.post(call["url"], json=body, headers=call["headers"])
            res["latency_s"] = time.perf_counter() - t0
            if r.status_code != 200:
                res["error"] = f"HTTP {r.status_code}"
                return res
            obj = r.json()
            text = obj["choices"][0]["message"]["content"] or ""
            res["by_b"] = served_by_b(obj.get("model"), r.headers, b_port)
            res["ok"] = text == expect
            res["error"] = None if res["ok"] else "incomplete text"
            return res
        body["stream"] = True
        parts, done, models, err = [], False, set(), None
        async with http.stream("POST", call["url"], json=body, headers=call["headers"]) as r:
            if r.status_code != 200:
                res["latency_s"] = time.perf_counter() - t0
                res["error"] = f"HTTP {r.status_code}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    err = "error event in stream"
                    continue
                models.add(obj.get("model"))
                for ch in obj.get("choices") or []:
                    parts.append((ch.get("delta") or {}).get("content") or "")
            hdrs = r.headers
        res["latency_s"] = time.perf_counter() - t0
        text = "".join(parts)
        res["by_b"] = any(served_by_b(m, hdrs, b_port) for m in models) or served_by_b(None, hdrs, b_port)
        if err:
            res["error"] = err + (" (partial text)" if text else "")
        elif not done:
            res["error"] = "stream ended without [DONE]"
        elif text != expect:
            res["error"] = "incomplete text"
        else:
            res["ok"] = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as e:
        res["latency_s"] = time.perf_counter() - t0
        res["error"] = type(e).__name__
    return res


async def run_mode(
    proxy: str, call: dict, mode: str, args: argparse.Namespace, ports: dict[str, int], procs: dict[str, Proc]
) -> dict:
    """Open loop at ``args.rate`` req/s for ``args.duration`` s; A faulty from ``onset`` to ``fault_end``.

    Times in the result are seconds from the start of the load. ``procs["A"]`` is replaced for
    ``killed`` (the new process listens from ``fault_end``).
    """
    stream = mode == "cut_stream"
    n = int(args.rate * args.duration)
    a_url = f"http://127.0.0.1:{ports['A']}"
    results: list[tuple[float, dict]] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    syns = SynCounter(ports["A"]) if mode == "killed" else None
    killed_at: list[float] = []
    async with httpx.AsyncClient(timeout=args.client_timeout, limits=limits) as http:
        await http.delete(f"{a_url}/arrivals")
        t0, w0 = time.perf_counter(), time.time()

        async def inject() -> None:
            await asyncio.sleep(args.onset)
            if mode == "killed":
                procs["A"].proc.send_signal(signal.SIGKILL)
                killed_at.append(time.time())
                procs["A"].stop()
                procs["A"] = start_loopback("A", ports["A"], Path(procs["A"].log).parent, w0 + args.fault_end)
            else:
                await http.post(f"{a_url}/fault", json=fault_body(mode, args))

        async def fire(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
            sent = time.perf_counter() - t0
            res = await one_request(http, call, f"p{proxy[0]}{mode}n{i}x", stream, ports["B"])
            results.append((sent, res))

        onset_task = asyncio.create_task(inject())
        await asyncio.gather(*(fire(i) for i in range(n)))
        await onset_task
        horizon = time.time() - w0
        if mode == "killed":
            procs["A"].wait_ready(30)
        log = (await http.get(f"{a_url}/arrivals")).json()
    if syns is not None:
        syns.close()
    arrivals = [{**e, "t": e["t"] - w0} for e in log["arrivals"]]
    served = [e["t"] for e in arrivals if e["mode"] == "ok" and e["outcome"] == "ok"]
    if mode == "killed":
        onset, end = killed_at[0] - w0, log["started_at"] - w0
        attempts = [t - w0 for t in syns.times] if syns.available else None
        attempts = None if attempts is None else attempts + [e["t"] for e in arrivals]
    else:
        changes = [(c["t"] - w0, c["mode"]) for c in log["faults"] if c["t"] >= w0]
        onset = next(t for t, m in changes if m == mode)
        end = next((t for t, m in changes if m == "ok" and t > onset), horizon)
        attempts = [e["t"] for e in arrivals]
    view = fault_window_figures(attempts or [], served, onset, end, args.quiet, horizon)
    if attempts is None:
        view.update(attempts_during_fault=None, dropped_after_s=None)
    during = [r for s, r in results if onset <= s < end]
    lat = np.asarray([r["latency_s"] for r in during if r["ok"]]) * 1000
    first_fb = [
        s + r["latency_s"] - onset
        for s, r in results
        if r["ok"] and r["by_b"] and s + r["latency_s"] >= onset
    ]
    return {
        "n": len(results),
        "success_share": sum(r["ok"] for _, r in results) / max(len(results), 1),
        "success_share_during": sum(r["ok"] for r in during) / max(len(during), 1),
        "errors": dict(Counter(r["error"] for _, r in results if not r["ok"])),
        "p50_ms_during": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms_during": float(np.percentile(lat, 99)) if len(lat) else None,
        "first_fallback_s": min(first_fb) if first_fb else None,
        "served_by_b_during": sum(r["by_b"] for r in during if r["ok"]),
        "onset_s": onset,
        "fault_end_s": end,
        "dropped_after_s": view["dropped_after_s"],
        "attempts_on_A_during_fault": view["attempts_during_fault"],
        "back_after_s": view["back_after_s"],
        "back_for_good_s": view["back_for_good_s"],
        "a_arrivals": [[round(e["t"], 4), e["mode"], e["outcome"]] for e in arrivals],
        "a_connection_attempts": None if syns is None else [round(t - w0, 4) for t in syns.times],
    }


async def warm_up(call: dict, b_port: int, n: int = 5) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(n):
            await one_request(http, call, "warm", False, b_port)


def print_table(cells: dict[str, dict[str, dict]], proxies: list[str]) -> None:
    """One row per mode and proxy, the proxies of a mode next to each other."""
    fmt = lambda v, f="{:.2f}", none="-": none if v is None else f.format(v)  # noqa: E731
    cols = f"{'mode':<11}{'proxy':<10}{'ok%':>5}{'p50ms':>7}{'p99ms':>7}{'1st fb s':>9}"
    print("\n" + cols + f"{'dropped s':>10}{'on A':>6}{'back s':>8}{'good s':>8}  errors seen")
    for mode, per in cells.items():
        for i, p in enumerate(proxies):
            c = per.get(p)
            if c is None:
                continue
            errs = ",".join(f"{k}x{v}" for k, v in c["errors"].items()) or "none"
            print(
                f"{mode if i == 0 else '':<11}{p:<10}{100 * c['success_share']:>5.0f}"
                f"{fmt(c['p50_ms_during'], '{:.0f}'):>7}{fmt(c['p99_ms_during'], '{:.0f}'):>7}"
                f"{fmt(c['first_fallback_s']):>9}"
                f"{fmt(c['dropped_after_s'], none='never' if c['attempts_on_A_during_fault'] is not None else 'n/a'):>10}"
                f"{fmt(c['attempts_on_A_during_fault'], '{:d}', 'n/a'):>6}{fmt(c['back_after_s'], none='never'):>8}"
                f"{fmt(c['back_for_good_s'], none='never'):>8}  {errs}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--ckpt", default=None, help="router checkpoint (default: train one into outputs/bench/ckpt)"
    )
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rate", type=float, default=10.0, help="requests per second (open loop)")
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of load per mode")
    ap.add_argument("--onset", type=float, default=2.0, help="seconds into the load when A fails")
    ap.add_argument(
        "--fault-end", type=float, default=5.0, help="seconds into the load when A is healthy again"
    )
    ap.add_argument(
        "--quiet", type=float, default=1.0, help="seconds without attempts on A that mean 'dropped'"
    )
    ap.add_argument("--retry-after", type=float, default=2.0, help="error429: Retry-After seconds")
    ap.add_argument("--slow-delay", type=float, default=0.05, help="slow: seconds before each token")
    ap.add_argument("--first-token-timeout", type=float, default=0.5, help="router-ml's first-token deadline")
    ap.add_argument("--timeout", type=float, default=3.0, help="whole-request timeout (both proxies)")
    ap.add_argument(
        "--cooldown", type=float, default=5.0, help="LiteLLM cooldown_time (router-ml's breaker: 5 s)"
    )
    ap.add_argument("--litellm-retries", type=int, default=0, help="LiteLLM num_retries before it falls back")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between runs")
    ap.add_argument("--client-timeout", type=float, default=30.0)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "faults.json"))
    args = ap.parse_args(argv)
    if not 0 <= args.onset < args.fault_end <= args.duration:
        ap.error(
            f"need 0 <= --onset ({args.onset}) < --fault-end ({args.fault_end}) <= --duration ({args.duration})"
        )
    ckpt = ensure_checkpoint(args.ckpt)
    litellm = None if args.no_litellm else ensure_litellm()
    cells: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmpdir:
        tmp = Path(tmpdir)
        procs: dict[str, Proc] = {}
        with stopping(procs):
            ports = {"A": free_port(), "B": free_port()}
            for name, port in ports.items():
                procs[name] = start_loopback(name, port, tmp)
            calls = start_proxies(ckpt, tmp, litellm, ports, procs, args)
            gc.collect()
            gc.freeze()
            for call in calls.values():  # warm-up: the proxies' first requests out of the figures
                asyncio.run(warm_up(call, ports["B"]))
            for mode in args.modes:
                cells[mode] = {}
                for proxy, call in calls.items():
                    cell = asyncio.run(run_mode(proxy, call, mode, args, ports, procs))
                    cells[mode][proxy] = cell
                    brief = {k: v for k, v in cell.items() if not k.startswith("a_")}
                    print(f"{mode:<11}{proxy:<10} {json.dumps(brief)}", flush=True)
                    httpx.post(f"http://127.0.0.1:{ports['A']}/fault", json={"mode": "ok"}, timeout=5)
                    time.sleep(args.settle)
    print_table(cells, list(calls))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "ckpt")}
    meta.update(ckpt=os.path.relpath(ckpt, ROOT), cpu_count=os.cpu_count(), litellm="litellm" in calls)
    out.write_text(json.dumps({"meta": meta, "cells": cells}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
