"""Proxy overhead benchmark: a direct call vs router-ml's proxy vs LiteLLM's proxy (issue 4).

    python -m experiments.bench_proxy                       # trains a small router if needed
    python -m experiments.bench_proxy --ckpt CHECKPOINT --duration 3 --warmup 1 --no-litellm
    python -m experiments.bench_proxy --head taskmix --concurrency 1 --no-litellm
    python -m experiments.bench_proxy --no-litellm --targets rml_pass --concurrency 32 \
        --backend-client fast httpx aiohttp --rounds 4     # which HTTP client the proxy should use

One run starts, as subprocesses stopped by PID: the project's loopback backend (the same fast
backend behind every path), ``router-ml serve`` (catalog: one backend ``loop``; every router model
aliased to it; memory ledger, no routing log) and LiteLLM's proxy from its own venv
``.venv-litellm`` (created with ``pip install 'litellm[proxy]'`` if missing; skipped with a message
if that fails). A closed-loop asyncio + httpx load generator (N workers, tiny prompts, each carrying
a unique marker that the loopback echoes) measures, at 1, 8 and 32 concurrent requests, non-stream
latency and streaming time to first token for: direct, router-ml pass-through (``model="loop"``),
router-ml routed (``model="router"``) and LiteLLM. It prints p50/p99 added over direct, req/s,
errors / lost / duplicated ids, router-ml's figures as ratios to LiteLLM's, the decision and
encoder times the proxy reports (``x-router-decision-ms``, ``x-router-encode-ms``; "+p50-enc" is
the routed p50 added minus the encoder's p50, the figure the "encoder + 1 ms" target is about), the
CPU each proxy process spent per request (from ``/proc``: robust on a shared machine, where wall
times are not), and writes ``outputs/bench/proxy.json``.

``--backend-client`` picks router-ml's own client to its backends (``ROUTER_ML_HTTP_CLIENT``:
``fast`` = :mod:`router_ml.backends.http11`, ``aiohttp``, ``httpx``); given several, with
``--rounds N``, the servers are restarted for each client in turn (A, B, C, A, B, C...) and the
pass-through req/s and p50 at the top concurrency are printed per client (median and every run),
with the winner's margin over the runner-up.

Conditions (the same for every target, so that the comparison stays side by side):

- ``--client fast`` (default): the load generator sends through router-ml's own HTTP/1.1 client
  (:mod:`router_ml.backends.http11`, about 0.1 ms of CPU per request where ``httpx`` takes ~0.7 ms),
  so that it steals less CPU from the servers it measures; ``--client httpx`` for the old one.
- ``--uvloop`` (default on): the load generator's event loop is uvloop, like the servers'.
- ``--pin``: on a machine with at least 2 cores, the load generator and the loopback backend are
  pinned to the first core and each proxy (router-ml, LiteLLM) to the second, so that a proxy never
  waits for a core taken by the load it is measured with. Off by default: a pinned router-ml also
  runs its encoder on one core. Say which you used when reporting figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import numpy as np
import orjson

from experiments.bench_servers import (
    BENCH_HEADS,
    MASTER_KEY,
    ROOT,
    Proc,
    ensure_checkpoint,
    ensure_litellm,
    litellm_proc,
    stopping,
    wait_ready,
)
from router_ml.backends.http11 import FastHTTP
from router_ml.backends.local.launch_spec import free_port

TARGETS = ("direct", "rml_pass", "rml_routed", "litellm")
BACKEND_CLIENTS = ("fast", "httpx", "aiohttp")


def start_servers(
    ckpt: Path, tmp: Path, litellm: Path | None, procs: dict[str, Proc], pin: bool = False
) -> dict[str, dict]:
    """Start loopback, router-ml and (optionally) LiteLLM into ``procs``; return each target's call
    (``pid``: the proxy process, for its CPU time). ``pin``: see the module docstring."""
    from router_ml.checkpoint import read_config

    lp, rp, llp = free_port(), free_port(), free_port()
    loop_url = f"http://127.0.0.1:{lp}"
    py = sys.executable
    procs["loopback"] = Proc(
        "loopback", [py, "-m", "tests.fakes.loopback", "--port", str(lp)], f"{loop_url}/health",
        tmp / "loopback.log",
    )  # fmt: skip
    procs["loopback"].wait_ready(30)
    catalog = tmp / "catalog.yaml"
    catalog.write_text(
        "backends:\n  - name: loop\n    kind: vllm\n"
        f"    base_url: {loop_url}/v1\n    served_model_id: loop\n    first_token_timeout_s: 5\n"
        "    prices: {gpu_hour_usd: 0.5, decode_tokens_per_s: 250}\n"
        "    latency: {ttft_s: 0.01, tokens_per_s: 1000}\n    context_window: 8192\n"
    )
    aliases = [a for m in read_config(ckpt)["models"] for a in ("--alias", f"{m}=loop")]
    rml = [py, "-m", "router_ml.cli", "serve", "--ckpt", str(ckpt), "--backends", str(catalog)]
    rml += ["--port", str(rp), "--ledger", "memory", "--routing-log", "", *aliases]
    procs["router-ml"] = Proc("router-ml", rml, f"http://127.0.0.1:{rp}/health", tmp / "router-ml.log")
    if litellm is not None:
        models = "  - model_name: loop\n    litellm_params:\n      model: openai/loop\n"
        models += f"      api_base: {loop_url}/v1\n      api_key: unused\n"
        procs["litellm"] = litellm_proc(litellm, models, "", llp, tmp)
    wait_ready(procs)
    if pin:
        os.sched_setaffinity(procs["loopback"].proc.pid, {0})
        for name in ("router-ml", "litellm"):
            if name in procs:
                os.sched_setaffinity(procs[name].proc.pid, {1})
    calls = {
        "direct": {"url": f"{loop_url}/v1/chat/completions", "model": "loop", "headers": {}},
        "rml_pass": {"url": f"http://127.0.0.1:{rp}/v1/chat/completions", "model": "loop", "headers": {}},
        "rml_routed": {"url": f"http://127.0.0.1:{rp}/v1/chat/completions", "model": "router", "headers": {}},
    }  # fmt: skip
    if "litellm" in procs:
        auth = {"authorization": f"Bearer {MASTER_KEY}"}
        calls["litellm"] = {
            "url": f"http://127.0.0.1:{llp}/v1/chat/completions",
            "model": "loop",
            "headers": auth,
        }
    for name, call in calls.items():
        call["url_obj"] = httpx.URL(call["url"])
        proc = {"rml_pass": "router-ml", "rml_routed": "router-ml", "litellm": "litellm"}.get(name)
        call["pid"] = procs[proc].proc.pid if proc else None
    return calls


def _request_body(call: dict, marker: str, stream: bool) -> dict:
    body = {
        "model": call["model"],
        "messages": [{"role": "user", "content": f"hi {marker} ok"}],
        "max_tokens": 32,
    }
    if stream:
        body["stream"] = True
    return body


def _stream_text(lines: list[str] | None, line: str, t0: float, ttft: float | None) -> float | None:
    """Feed one SSE ``line``; appends content to ``lines``; returns the TTFT so far."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return ttft
    obj = orjson.loads(line[6:])
    if "error" in obj:
        raise RuntimeError("error event in stream")
    for ch in obj.get("choices") or []:
        text = (ch.get("delta") or {}).get("content")
        if text:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            lines.append(text)
    return ttft


async def one_request(http: Any, call: dict, marker: str, stream: bool) -> tuple[float, str, Any]:
    """``(seconds to the answer or first token, echoed text, response headers)``; raises on errors.

    ``http``: an ``httpx.AsyncClient`` or a :class:`~router_ml.backends.http11.FastHTTP`."""
    body = _request_body(call, marker, stream)
    parts: list[str] = []
    ttft = None
    t0 = time.perf_counter()
    if isinstance(http, FastHTTP):
        headers = {"content-type": "application/json", **call["headers"]}
        r = await http.request(
            call["url_obj"], orjson.dumps(body), headers, connect_timeout=5, read_timeout=30
        )
        if not stream:
            await r.aread()
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            return dt, r.json()["choices"][0]["message"]["content"], r.headers
        try:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            async for line in r.aiter_lines():
                ttft = _stream_text(parts, line, t0, ttft)
        finally:
            await r.aclose()
    elif not stream:
        r = await http.post(call["url"], json=body, headers=call["headers"])
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        return dt, r.json()["choices"][0]["message"]["content"], r.headers
    else:
        async with http.stream("POST", call["url"], json=body, headers=call["headers"]) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            async for line in r.aiter_lines():
                ttft = _stream_text(parts, line, t0, ttft)
    if ttft is None:
        raise RuntimeError("stream carried no content")
    return ttft, "".join(parts), r.headers


async def run_cell(
    call: dict,
    conc: int,
    stream: bool,
    warmup: float,
    duration: float,
    tag: str,
    client: str = "fast",
    pid: int | None = None,
) -> dict:
    """Closed loop: ``conc`` workers send back to back for warmup + duration seconds.

    Each worker has its own client (one keep-alive connection): one shared ``httpx`` pool
    collapses above ~8 concurrent requests (32 workers on one pool: ~300 req/s against the loopback,
    one client per worker: ~900), which would make the load generator the bottleneck. ``pid``: the
    proxy process whose CPU time per measured request is reported.
    """
    lat: list[float] = []
    dec: list[float] = []
    enc: list[float] = []
    cpu0: float | None = None
    errors: Counter[str] = Counter()
    echoed: Counter[str] = Counter()
    sent: list[str] = []
    mismatched = 0
    t_start = time.perf_counter()
    t_meas, t_end = t_start + warmup, t_start + warmup + duration

    async def worker(w: int) -> None:
        nonlocal mismatched, cpu0
        i = 0
        http: Any = FastHTTP() if client == "fast" else httpx.AsyncClient(timeout=30.0)
        try:
            while (now := time.perf_counter()) < t_end:
                marker = f"m{tag}w{w}n{i}x"
                i += 1
                measured = now >= t_meas
                if measured and cpu0 is None and pid is not None:
                    cpu0 = cpu_seconds(pid)
                if measured:
                    sent.append(marker)
                try:
                    dt, text, headers = await one_request(http, call, marker, stream)
                except Exception as e:  # every failure is counted, by kind
                    if measured:
                        errors[str(e)[:60] or type(e).__name__] += 1
                    continue
                if not measured:
                    continue
                got = [w for w in text.split() if w.startswith(f"m{tag}w")]
                for g in got:
                    echoed[g] += 1
                if marker not in got:
                    mismatched += 1
                    continue
                lat.append(dt)
                if headers.get("x-router-decision-ms") is not None:
                    dec.append(float(headers["x-router-decision-ms"]))
                if headers.get("x-router-encode-ms") is not None:
                    enc.append(float(headers["x-router-encode-ms"]))
        finally:
            await http.aclose()

    await asyncio.gather(*(worker(w) for w in range(conc)))
    elapsed = time.perf_counter() - t_meas
    cpu = (cpu_seconds(pid) - cpu0) if pid is not None and cpu0 is not None else None
    lost = sum(1 for m in sent if echoed[m] == 0)
    a = np.asarray(lat) * 1000
    return {
        "n": len(lat),
        "p50_ms": float(np.percentile(a, 50)) if len(a) else None,
        "p99_ms": float(np.percentile(a, 99)) if len(a) else None,
        "rps": len(lat) / elapsed,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "lost": lost,
        "duplicated": sum(1 for c in echoed.values() if c > 1),
        "mismatched": mismatched,
        "decision_ms_p50": float(np.median(dec)) if dec else None,
        "encode_ms_p50": float(np.median(enc)) if enc else None,
        "proxy_cpu_ms_per_req": cpu * 1000 / max(1, len(lat) + sum(errors.values()))
        if cpu is not None
        else None,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(cells: dict[str, dict], targets: list[str], concs: list[int]) -> dict[str, Any]:
    """Added latency over direct per (target, mode, concurrency), req/s at the top concurrency, ratios."""
    added: dict[str, Any] = {}
    for key, c in cells.items():
        target, mode, conc = key.split("|")
        base = cells.get(f"direct|{mode}|{conc}")
        if target == "direct" or not base or c["p50_ms"] is None or base["p50_ms"] is None:
            continue
        added[key] = {"p50_ms": c["p50_ms"] - base["p50_ms"], "p99_ms": c["p99_ms"] - base["p99_ms"]}
        if c.get("encode_ms_p50") is not None:
            added[key]["p50_minus_encode_ms"] = added[key]["p50_ms"] - c["encode_ms_p50"]
    top = max(concs)
    rps = {t: cells[f"{t}|nonstream|{top}"]["rps"] for t in targets}
    ratios: dict[str, Any] = {}
    if "litellm" in targets:
        for t in ("rml_pass", "rml_routed"):
            ratios[f"{t}/litellm rps@{top}"] = rps[t] / rps["litellm"]
            for key, v in added.items():
                if key.startswith(t + "|"):
                    ref = added.get(key.replace(t, "litellm", 1))
                    if ref and ref["p50_ms"] > 0:
                        ratios[f"{key} added p50 / litellm"] = v["p50_ms"] / ref["p50_ms"]
    return {"added_over_direct": added, f"rps_nonstream@{top}": rps, "ratios_to_litellm": ratios}


def print_table(cells: dict[str, dict], summary: dict[str, Any]) -> None:
    head = f"{'target':<11}{'mode':<10}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'+p50':>8}{'+p99':>8}"
    tail = (
        f"{'req/s':>8}{'err':>5}{'lost':>5}{'dup':>5}{'dec p50':>9}{'enc p50':>9}{'+p50-enc':>9}{'cpu ms':>8}"
    )
    print("\n" + head + tail)
    for key, c in cells.items():
        target, mode, conc = key.split("|")
        add = summary["added_over_direct"].get(key, {})
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(
            f"{target:<11}{mode:<10}{conc:>5}{fmt(c['p50_ms']):>9}{fmt(c['p99_ms']):>9}"
            f"{fmt(add.get('p50_ms')):>8}{fmt(add.get('p99_ms')):>8}{c['rps']:>8.0f}{c['errors']:>5}"
            f"{c['lost']:>5}{c['duplicated']:>5}{fmt(c['decision_ms_p50']):>9}{fmt(c.get('encode_ms_p50')):>9}"
            f"{fmt(add.get('p50_minus_encode_ms')):>9}{fmt(c.get('proxy_cpu_ms_per_req')):>8}"
        )
    print("\nratios of router-ml to LiteLLM (added latency: lower is better; req/s: higher is better):")
    for k, v in summary["ratios_to_litellm"].items() or {"(LiteLLM not measured)": float("nan")}.items():
        print(f"  {k:<45} {v:.3f}")


def measure(args: argparse.Namespace, ckpt: Path, litellm: Path | None, backend_client: str | None) -> dict:
    """Start the servers (router-ml's backend HTTP client: ``backend_client``), run every cell,
    stop them; ``{"cells", "targets", "pinned"}``."""
    if backend_client:
        os.environ["ROUTER_ML_HTTP_CLIENT"] = backend_client  # inherited by the router-ml process
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmpdir:
        tmp = Path(tmpdir)
        procs: dict[str, Proc] = {}
        with stopping(procs):
            pin = args.pin and len(os.sched_getaffinity(0)) >= 2
            calls = start_servers(ckpt, tmp, litellm, procs, pin=pin)
            calls = {t: c for t, c in calls.items() if t in args.targets or t == "direct"}
            if pin:
                os.sched_setaffinity(0, {0})
            loop_factory = None
            if args.uvloop:
                import uvloop

                loop_factory = uvloop.new_event_loop
            gc.collect()
            gc.freeze()  # the load generator's own start-up objects out of the collector's way
            cells: dict[str, dict] = {}
            for conc in args.concurrency:
                for mode in ("nonstream", "stream"):
                    for target, call in calls.items():
                        tag = f"{TARGETS.index(target)}{mode[0]}{conc}"
                        cell_run = run_cell(
                            call,
                            conc,
                            mode == "stream",
                            args.warmup,
                            args.duration,
                            tag,
                            args.client,
                            call["pid"],
                        )
                        with asyncio.Runner(loop_factory=loop_factory) as runner:
                            cell = runner.run(cell_run)
                        cells[f"{target}|{mode}|{conc}"] = cell
                        print(f"{target:<11}{mode:<10}c={conc:<3} {json.dumps(cell)}", flush=True)
            gc.unfreeze()
            if pin:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {"cells": cells, "targets": list(calls), "pinned": pin}


def compare_clients(runs: list[dict], conc: int) -> dict[str, Any]:
    """Pass-through (``rml_pass``) req/s and p50 at ``conc`` per backend client over alternating
    runs: every run, the medians, and the winner's margin over the runner-up (req/s)."""
    per: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        c = run["cells"][f"rml_pass|nonstream|{conc}"]
        d = run["cells"][f"direct|nonstream|{conc}"]
        got = per.setdefault(run["backend_client"], {"rps": [], "p50_ms": [], "stream_p50_ms": []})
        got["rps"].append(c["rps"])
        got["p50_ms"].append(c["p50_ms"] - d["p50_ms"])
        got["stream_p50_ms"].append(run["cells"][f"rml_pass|stream|{conc}"]["p50_ms"])
    med = {k: {m: float(np.median(v)) for m, v in got.items()} for k, got in per.items()}
    ranked = sorted(med, key=lambda k: med[k]["rps"], reverse=True)
    out: dict[str, Any] = {"concurrency": conc, "runs": per, "medians": med, "ranking": ranked}
    if len(ranked) > 1:
        out["winner_margin"] = med[ranked[0]]["rps"] / med[ranked[1]]["rps"] - 1
    print(f"\nrouter-ml pass-through, non-stream, concurrency {conc}, by backend HTTP client "
          f"({len(runs)} runs, alternating):")  # fmt: skip
    print(f"{'client':<9}{'median req/s':>14}{'median +p50 ms':>16}{'stream p50 ms':>15}  all req/s")
    for k in ranked:
        runs_rps = " ".join(f"{v:.0f}" for v in per[k]["rps"])
        print(
            f"{k:<9}{med[k]['rps']:>14.0f}{med[k]['p50_ms']:>16.2f}{med[k]['stream_p50_ms']:>15.2f}  {runs_rps}"
        )
    if len(ranked) > 1:
        print(f"winner: {ranked[0]}, {100 * out['winner_margin']:+.1f}% req/s over {ranked[1]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--ckpt", default=None, help="router checkpoint (default: train one into outputs/bench/ckpt)"
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    ap.add_argument("--head", choices=BENCH_HEADS, default="knn", help="quality head of the trained router")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=list(TARGETS),
        help="what to measure ('direct' always)",
    )
    ap.add_argument(
        "--client", choices=["fast", "httpx"], default="fast", help="the load generator's HTTP client"
    )
    ap.add_argument(
        "--backend-client",
        nargs="+",
        choices=BACKEND_CLIENTS,
        default=None,
        help="router-ml's HTTP client to its backends; several: compared in alternating runs",
    )
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs per --backend-client")
    ap.add_argument(
        "--uvloop", action=argparse.BooleanOptionalAction, default=True, help="uvloop for the load generator"
    )
    ap.add_argument(
        "--pin", action="store_true", help="load generator + backend on core 0, proxies on core 1"
    )
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "proxy.json"))
    args = ap.parse_args(argv)
    ckpt = ensure_checkpoint(args.ckpt, args.head)
    litellm = None if args.no_litellm else ensure_litellm()
    clients = args.backend_client or [None]
    runs = []
    for r in range(args.rounds):
        for bc in clients:
            if len(clients) > 1 or args.rounds > 1:
                print(f"\n=== round {r + 1}/{args.rounds}, backend client {bc}", flush=True)
            runs.append({**measure(args, ckpt, litellm, bc), "backend_client": bc, "round": r})
    last = runs[-1]
    summary = summarise(last["cells"], last["targets"], args.concurrency)
    print_table(last["cells"], summary)
    if len(runs) > 1 and "rml_pass" in last["targets"]:
        summary["backend_clients"] = compare_clients(runs, max(args.concurrency))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ckpt": os.path.relpath(ckpt, ROOT), "duration_s": args.duration, "warmup_s": args.warmup,
            "cpu_count": os.cpu_count(), "litellm": "litellm" in last["targets"], "client": args.client,
            "backend_clients": clients, "rounds": args.rounds, "uvloop": args.uvloop,
            "pinned": last["pinned"]}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "cells": last["cells"], "runs": runs, **summary}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
