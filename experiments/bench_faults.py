"""Fault-injection benchmark: router-ml's proxy vs LiteLLM's proxy, one backend misbehaving (issue 4).

    python -m experiments.bench_faults                        # trains a small router if needed
    python -m experiments.bench_faults --duration 8 --onset 2 --rate 10 --modes error500 hang

Two loopback backends ``A`` and ``B`` (subprocesses, stopped by PID). router-ml serves a catalog of
both, with one router model aliased to each; requests use ``model="router:utility:<big lam>"`` so
the decision picks the cheap ``A`` and its fallback chain is ``[A, B]``. LiteLLM serves ``A`` and
``B`` with its own retries, fallbacks ``A -> B``, cooldown and timeout. For each fault mode an open
loop sends ``rate`` req/s for ``duration`` seconds (streaming for ``cut_stream``, non-stream
otherwise); the fault is switched on on ``A`` ``onset`` seconds in (``killed``: A's process is
SIGKILLed, and restarted after the run). A request succeeds only with HTTP 200 and the loopback's
full deterministic answer (streams: also a ``[DONE]`` and no error event). Per proxy and mode it
reports the success share, the errors the client saw, p50/p99 latency of requests sent during the
fault, and the time from onset to the first success served by ``B``; JSON goes to
``outputs/bench/faults.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from experiments.bench_proxy import (
    MASTER_KEY,
    ROOT,
    Proc,
    ensure_checkpoint,
    ensure_litellm,
    free_port,
    litellm_proc,
    wait_ready,
)
from router_ml.serving.loopback import answer_text

MODES = ("error500", "error503", "error429", "killed", "hang", "slow", "cut_stream")
ROUTED = "router:utility:1000000"  # a huge lam: the cheapest model (A) first, B as its fallback
A_MODEL, B_MODEL = "gpt-4o-mini", "gpt-4o"  # router models aliased to A and B


def fault_body(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /fault`` body for ``mode`` (``killed`` is not a loopback fault)."""
    if mode == "error429":
        return {"mode": mode, "retry_after": args.retry_after}
    if mode == "error503":
        return {"mode": mode, "retry_after": None}
    if mode == "slow":
        return {"mode": mode, "delay_s": args.slow_delay}
    if mode == "cut_stream":
        return {"mode": mode, "after": 3}
    return {"mode": mode}


def start_loopback(name: str, port: int, tmp: Path) -> Proc:
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "router_ml.serving.loopback", "--port", str(port), "--model-id", name]
    proc = Proc(name, cmd, f"{url}/health", tmp / f"loopback-{name}-{time.monotonic_ns()}.log")
    proc.wait_ready(30)
    return proc


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
        settings = (
            f'  num_retries: {args.litellm_retries}\n  fallbacks: [{{"A": ["B"]}}]\n'
            f"  allowed_fails: 3\n  cooldown_time: {args.cooldown}\n  timeout: {args.timeout}\n"
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
    """Open loop at ``args.rate`` req/s for ``args.duration`` s; the fault on A at ``args.onset`` s."""
    stream = mode == "cut_stream"
    n = int(args.rate * args.duration)
    a_url = f"http://127.0.0.1:{ports['A']}"
    results: list[tuple[float, dict]] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=args.client_timeout, limits=limits) as http:
        t0 = time.perf_counter()

        async def inject() -> float:
            await asyncio.sleep(args.onset)
            if mode == "killed":
                procs["A"].proc.send_signal(signal.SIGKILL)
            else:
                await http.post(f"{a_url}/fault", json=fault_body(mode, args))
            return time.perf_counter() - t0

        async def fire(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
            sent = time.perf_counter() - t0
            res = await one_request(http, call, f"p{proxy[0]}{mode}n{i}x", stream, ports["B"])
            results.append((sent, res))

        onset_task = asyncio.create_task(inject())
        await asyncio.gather(*(fire(i) for i in range(n)))
        onset = await onset_task
    during = [r for s, r in results if s >= onset]
    lat = np.asarray([r["latency_s"] for r in during if r["ok"]]) * 1000
    first_fb = [
        s + r["latency_s"] - onset
        for s, r in results
        if r["ok"] and r["by_b"] and s + r["latency_s"] >= onset
    ]
    errors = Counter(r["error"] for _, r in results if not r["ok"])
    return {
        "n": len(results),
        "success_share": sum(r["ok"] for _, r in results) / max(len(results), 1),
        "success_share_during": sum(r["ok"] for r in during) / max(len(during), 1),
        "errors": dict(errors),
        "p50_ms_during": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms_during": float(np.percentile(lat, 99)) if len(lat) else None,
        "first_fallback_s": min(first_fb) if first_fb else None,
        "served_by_b_during": sum(r["by_b"] for r in during if r["ok"]),
        "onset_s": onset,
    }


async def warm_up(call: dict, b_port: int, n: int = 5) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(n):
            await one_request(http, call, "warm", False, b_port)


def reset_a(mode: str, ports: dict[str, int], procs: dict[str, Proc], tmp: Path) -> None:
    """A healthy again: restarted after ``killed``, its fault cleared otherwise."""
    if mode == "killed":
        procs["A"].stop()
        procs["A"] = start_loopback("A", ports["A"], tmp)
    else:
        httpx.post(f"http://127.0.0.1:{ports['A']}/fault", json={"mode": "ok"}, timeout=5)


def print_table(cells: dict[str, dict[str, dict]], proxies: list[str]) -> None:
    fmt = lambda v, f="{:.0f}": "-" if v is None else f.format(v)  # noqa: E731
    print(f"\n{'mode':<11}" + "".join(f"| {p:<47}" for p in proxies))
    print(
        f"{'':<11}"
        + f"| {'ok%':>5}{'p50ms':>7}{'p99ms':>7}{'1st fb s':>9}  {'errors seen':<17}" * len(proxies)
    )
    for mode, per in cells.items():
        row = f"{mode:<11}"
        for p in proxies:
            c = per.get(p)
            if c is None:
                row += f"| {'-':<47}"
                continue
            errs = ",".join(f"{k}x{v}" for k, v in c["errors"].items()) or "none"
            row += (
                f"| {100 * c['success_share']:>5.0f}{fmt(c['p50_ms_during']):>7}{fmt(c['p99_ms_during']):>7}"
                f"{fmt(c['first_fallback_s'], '{:.2f}'):>9}  {errs[:17]:<17}"
            )
        print(row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--ckpt", default=None, help="router checkpoint (default: train one into outputs/bench/ckpt)"
    )
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rate", type=float, default=10.0, help="requests per second (open loop)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of load per mode")
    ap.add_argument("--onset", type=float, default=2.0, help="seconds into the load when A fails")
    ap.add_argument("--retry-after", type=float, default=2.0, help="error429: Retry-After seconds")
    ap.add_argument("--slow-delay", type=float, default=0.05, help="slow: seconds before each token")
    ap.add_argument("--first-token-timeout", type=float, default=0.5, help="router-ml's first-token deadline")
    ap.add_argument("--timeout", type=float, default=3.0, help="whole-request timeout (both proxies)")
    ap.add_argument("--cooldown", type=float, default=5.0, help="LiteLLM cooldown_time")
    ap.add_argument("--litellm-retries", type=int, default=0, help="LiteLLM num_retries before it falls back")
    ap.add_argument("--settle", type=float, default=6.0, help="seconds between runs (cooldowns expire)")
    ap.add_argument("--client-timeout", type=float, default=30.0)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "faults.json"))
    args = ap.parse_args(argv)
    ckpt = ensure_checkpoint(args.ckpt)
    litellm = None if args.no_litellm else ensure_litellm()
    cells: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmpdir:
        tmp = Path(tmpdir)
        procs: dict[str, Proc] = {}
        try:
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
                    print(f"{mode:<11}{proxy:<10} {json.dumps(cell)}", flush=True)
                    reset_a(mode, ports, procs, tmp)
                    time.sleep(args.settle)
        except BaseException:
            for p in procs.values():
                print(f"--- {p.name} log tail ---\n{p.log.read_text()[-2000:]}", file=sys.stderr)
            raise
        finally:
            for p in reversed(list(procs.values())):
                p.stop()
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
