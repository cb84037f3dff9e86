"""Caps that hold: concurrent requests at the edge of a budget, across proxy replicas (issue 15).

    python -m experiments.bench_caps                          # trains a small router if needed
    python -m experiments.bench_caps --ckpt CHECKPOINT --requests 64 --rounds 3 --turns 6

Starts, as subprocesses stopped by PID: a real ``redis-server`` (``ROUTER_ML_REDIS_SERVER`` or the
one on PATH), the project's loopback backend (behind two catalog entries: ``cheap`` at $0.1/$0.2
and ``pricey`` at $3/$15 per 1M tokens) and ``router-ml serve`` replicas.

1. **Spend at the edge of a budget**: ``--replicas`` (3) proxies share one Redis ledger and a
   ``--budget-usd`` cap per day, of which ``--prespent`` (90 %) is already spent (one ledger row
   for earlier traffic), so the burst lands at the edge; ``--requests`` (64) requests are sent at once, round-robin over the
   replicas, half pass-through to ``pricey`` and half routed (``router:utility:0``, the best
   model). The loopback answers slowly (``--delay-s`` per token) so that every request is in flight
   together. Printed per round: spend (the ledger's), cap, the largest bound a request held
   (``x-router-reserved-usd``), requests served / refused (429) / failed, and whether spend stayed
   within cap + one bound. Without reservations, every request that started would be billed.
2. **What a reservation costs**, in-process (robust to the machine's load): per ledger kind,
   ``--micro`` requests booked with ``record`` alone and with ``SpendGuard.reserve`` (token count,
   bound, the atomic check-and-hold) + ``record`` (the settle), in alternating blocks; median us.
3. **Added latency of reservations**: one proxy without a cap and one with an unreachable cap
   (every request reserves and settles), on the same ledger kind (``--ledgers``: memory, sqlite,
   redis), measured in alternating turns (``--turns`` x ``--per-turn`` sequential requests per
   path): p50 of pass-through and routed latency with and without the cap, and the difference.

4. **Virtual keys at the edge** (``--skip-keys`` to leave out): ``--replicas`` proxies share one
   Redis key store (``--keys-db redis://...``); one key allows ``--key-rpm`` requests a minute,
   another has a ``--key-budget-usd`` budget; ``--requests`` concurrent requests per key, half
   pass-through to ``pricey``, half routed. Printed per round: served, refused (429 by code), served
   beyond the key's limit (must be 0), the key's spend vs its budget.
5. **What a key check costs**, in-process (robust to the machine's load): per key store, median us
   per request of each step a keyed request takes (authenticate, its budget scopes, the token and
   cost bound, rate admission, budget hold, then settling both), ``--micro`` requests.
6. **Added latency of the key check** (+ its budget reservation and rate admission): one proxy
   without keys and one whose requests carry a key with a budget, rpm and tpm it never reaches, per
   key store (``--key-stores``: sqlite, redis), in alternating turns, as in 3.

Writes ``outputs/bench/caps.json``. The machine's load moves wall times: rerun on a quiet machine
and compare within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import numpy as np

from experiments.bench_proxy import cpu_seconds
from experiments.bench_servers import ROOT, Proc, ensure_checkpoint, stopping
from router_ml.backends.local.launch_spec import free_port

PROMPT = "Summarise in one line why budgets need hard caps (request {i})."


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port (no persistence), stopped on exit; yields its URL."""
    exe = os.environ.get("ROUTER_ML_REDIS_SERVER") or shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found (set ROUTER_ML_REDIS_SERVER)")
    import redis

    port = free_port()
    log = open(tmp / "redis.log", "w")  # noqa: SIM115 - the child keeps it
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([exe, *args], stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    while True:
        try:
            if client.ping():
                break
        except redis.exceptions.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {tmp / 'redis.log'}") from None
            time.sleep(0.05)
    client.close()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def store_spec(kind: str, tmp: Path, name: str) -> Iterator[str]:
    """The ``--ledger`` / ``--keys-db`` spec of a fresh store of ``kind`` (memory, sqlite, redis)."""
    if kind == "redis":
        with redis_server(tmp) as url:
            yield url
    else:
        yield "memory" if kind == "memory" else f"sqlite:{tmp / f'{name}-{time.monotonic_ns()}.sqlite'}"


def write_catalog(tmp: Path, loop_url: str) -> Path:
    path = tmp / "catalog.yaml"
    entries = []
    for name, pin, pout in (("cheap", 0.1, 0.2), ("pricey", 3.0, 15.0)):
        entries.append(
            f"  - name: {name}\n    kind: api\n    base_url: {loop_url}/v1\n    served_model_id: {name}\n"
            f"    prices: {{input_per_mtok: {pin}, output_per_mtok: {pout}}}\n"
            "    latency: {ttft_s: 0.05, tokens_per_s: 200}\n    first_token_timeout_s: 30\n"
            "    timeout_s: 60\n"
        )
    path.write_text("backends:\n" + "".join(entries))
    return path


def start_proxy(name: str, ckpt: Path, catalog: Path, ledger: str, tmp: Path, extra: list[str]) -> Proc:
    from router_ml.checkpoint import read_config

    port = free_port()
    models = read_config(ckpt)["models"]
    aliases = [a for k, m in enumerate(models) for a in ("--alias", f"{m}={'pricey' if k % 2 else 'cheap'}")]
    cmd = [sys.executable, "-m", "router_ml.cli", "serve", "--ckpt", str(ckpt), "--backends", str(catalog)]
    cmd += ["--port", str(port), "--ledger", ledger, "--routing-log", "", *aliases, *extra]
    proc = Proc(name, cmd, f"http://127.0.0.1:{port}/health", tmp / f"{name}.log")
    proc.url = f"http://127.0.0.1:{port}/v1/chat/completions"  # type: ignore[attr-defined]
    return proc


async def burst(urls: list[str], n: int, secret: str | None = None) -> list[dict[str, Any]]:
    """``n`` requests at once, round-robin over ``urls``, half pass-through, half routed (with the
    virtual key ``secret``, if given)."""
    limits = httpx.Limits(max_connections=n + 4)
    headers = {"authorization": f"Bearer {secret}"} if secret else None
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as http:

        async def one(i: int) -> dict[str, Any]:
            model = "pricey" if i % 2 == 0 else "router:utility:0"
            body = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(i=i)}]}
            r = await http.post(urls[i % len(urls)], json=body)
            out = {"status": r.status_code, "route": "pass" if i % 2 == 0 else "routed"}
            out["bound"] = float(r.headers.get("x-router-reserved-usd", "nan"))
            if r.status_code == 200:
                out["served"] = r.json().get("model")
            else:
                out["code"] = r.json()["error"].get("code")
            return out

        return await asyncio.gather(*(one(i) for i in range(n)))


def edge_of_budget(args: argparse.Namespace, ckpt: Path, tmp: Path, loop: Proc, procs: dict) -> list[dict]:
    import redis

    from router_ml.decision.ledger.redis import RedisLedger

    with redis_server(tmp) as url:
        catalog = write_catalog(tmp, loop.base_url)  # type: ignore[attr-defined]
        extra = ["--budget-usd", repr(args.budget_usd), "--period", "day"]
        extra += ["--default-max-tokens", str(args.max_tokens)]
        names = [f"replica{k}" for k in range(args.replicas)]
        for name in names:
            procs[name] = start_proxy(name, ckpt, catalog, url, tmp, extra)
        for name in names:
            procs[name].wait_ready(900)
        urls = [procs[n].url for n in names]
        httpx.post(f"{loop.base_url}/fault", json={"mode": "slow", "delay_s": args.delay_s})  # type: ignore[attr-defined]
        rounds = []
        for r in range(args.rounds):
            redis.Redis.from_url(url).flushdb()  # a fresh budget per round
            with RedisLedger(url) as ledger:
                ledger.record(args.prespent * args.budget_usd, "earlier-traffic", request_id="earlier")
            t0 = time.perf_counter()
            got = asyncio.run(burst(urls, args.requests))
            wall = time.perf_counter() - t0
            ledger = RedisLedger(url)
            spent, held = ledger.spent(), ledger.reserved()
            ledger.close()
            bounds = [g["bound"] for g in got if np.isfinite(g["bound"])]
            row = {
                "round": r,
                "spent_usd": spent,
                "cap_usd": args.budget_usd,
                "max_bound_usd": max(bounds) if bounds else None,
                "served": sum(g["status"] == 200 for g in got),
                "refused_429": sum(g["status"] == 429 for g in got),
                "failed": sum(g["status"] not in (200, 429) for g in got),
                "served_pass": sum(g["status"] == 200 and g["route"] == "pass" for g in got),
                "served_routed": sum(g["status"] == 200 and g["route"] == "routed" for g in got),
                "held_after_usd": held,
                "wall_s": wall,
            }
            row["within_cap"] = spent <= args.budget_usd + 1e-12
            row["within_cap_plus_one_bound"] = spent <= args.budget_usd + (row["max_bound_usd"] or 0.0)
            rounds.append(row)
        httpx.post(f"{loop.base_url}/fault", json={"mode": "ok"})  # type: ignore[attr-defined]
        for name in names:
            procs.pop(name).stop()
        return rounds


async def sequential(url: str, model: str, n: int, tag: str, secret: str | None = None) -> list[float]:
    out = []
    headers = {"authorization": f"Bearer {secret}"} if secret else None
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        for i in range(n):
            body = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(i=f"{tag}-{i}")}]}
            t0 = time.perf_counter()
            r = await http.post(url, json=body)
            out.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
    return out


def proxies_in_turns(
    args: argparse.Namespace,
    ckpt: Path,
    catalog: Path,
    ledger: str,
    tmp: Path,
    procs: dict,
    variants: dict[str, tuple[list[str], str | None]],
    prefix: str,
) -> dict[str, dict[str, float]]:
    """Two proxies (``variants``: name -> (extra ``serve`` args, key secret or None), the baseline
    first) sent ``--per-turn`` sequential pass-through and routed requests in alternating turns (the
    first turn warms up); per path: p50 latency and the proxy process's CPU per request of each
    variant (user + system from /proc: robust to load) and the second's added p50."""
    names = {v: f"{prefix}-{v}" for v in variants}
    for v, (extra, _) in variants.items():
        procs[names[v]] = start_proxy(names[v], ckpt, catalog, ledger, tmp, extra)
    for v in variants:
        procs[names[v]].wait_ready(900)
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], float] = {}
    for turn in range(args.turns):
        order = list(variants) if turn % 2 == 0 else list(variants)[::-1]
        for v in order:
            for path, model in (("pass", "cheap"), ("routed", "router:utility:0")):
                url, pid = procs[names[v]].url, procs[names[v]].proc.pid
                c0 = cpu_seconds(pid)
                got = asyncio.run(
                    sequential(url, model, args.per_turn, f"{prefix}{turn}{v}{path}", variants[v][1])
                )
                if turn > 0:
                    times.setdefault((v, path), []).extend(got)
                    cpu[(v, path)] = cpu.get((v, path), 0.0) + cpu_seconds(pid) - c0
    base, other = list(variants)
    cell = {}
    for path in ("pass", "routed"):
        p50 = {v: float(np.median(times[(v, path)])) * 1000 for v in variants}
        cell[path] = {
            **{f"p50_ms_{v}": p50[v] for v in variants},
            "added_ms": p50[other] - p50[base],
            **{f"cpu_ms_{v}": cpu[(v, path)] / len(times[(v, path)]) * 1000 for v in variants},
            "n": len(times[(other, path)]),
        }
    for v in variants:
        procs.pop(names[v]).stop()
    return cell


def added_latency(args: argparse.Namespace, ckpt: Path, tmp: Path, loop: Proc, procs: dict) -> dict:
    """p50 latency and CPU per request without a spend cap and with one (reservations)."""
    catalog = write_catalog(tmp, loop.base_url)  # type: ignore[attr-defined]
    results: dict[str, Any] = {}
    for kind in args.ledgers:
        with store_spec(kind, tmp, "spend") as spec:
            variants = {
                "no_cap": ([], None),
                "cap": (["--budget-usd", "1e9", "--default-max-tokens", "64"], None),
            }
            results[kind] = proxies_in_turns(args, ckpt, catalog, spec, tmp, procs, variants, f"lat-{kind}")
    return results


def keys_at_the_edge(args: argparse.Namespace, ckpt: Path, tmp: Path, loop: Proc, procs: dict) -> list[dict]:
    """Rounds of ``--requests`` concurrent requests per key over replicas sharing a Redis key store."""
    import redis

    from router_ml.serving.keys import key_usage, open_key_store

    with redis_server(tmp) as url:
        catalog = write_catalog(tmp, loop.base_url)  # type: ignore[attr-defined]
        extra = ["--keys-db", url, "--default-max-tokens", str(args.max_tokens)]
        names = [f"keyed{k}" for k in range(args.replicas)]
        for name in names:
            procs[name] = start_proxy(name, ckpt, catalog, "memory", tmp, extra)
        for name in names:
            procs[name].wait_ready(900)
        urls = [procs[n].url for n in names]
        httpx.post(f"{loop.base_url}/fault", json={"mode": "slow", "delay_s": args.delay_s})  # type: ignore[attr-defined]
        rounds = []
        for r in range(args.rounds):
            redis.Redis.from_url(url).flushdb()  # fresh keys, windows and spend per round
            with open_key_store(url) as store:
                _, rpm_secret = store.create_key("rpm-key", rpm=args.key_rpm)
                budget_key, budget_secret = store.create_key("budget-key", budget_usd=args.key_budget_usd)
            t0 = time.perf_counter()
            by_rpm = asyncio.run(burst(urls, args.requests, rpm_secret))
            by_budget = asyncio.run(burst(urls, args.requests, budget_secret))
            wall = time.perf_counter() - t0
            with open_key_store(url) as store:
                usage = key_usage(store, budget_key)
            bounds = [g["bound"] for g in by_budget if np.isfinite(g["bound"])]
            served_rpm = sum(g["status"] == 200 for g in by_rpm)
            rounds.append({
                "round": r,
                "rpm": args.key_rpm,
                "rpm_served": served_rpm,
                "rpm_refused_429": sum(g["status"] == 429 and g.get("code") == "rate_limit_exceeded" for g in by_rpm),
                "rpm_failed": sum(g["status"] not in (200, 429) for g in by_rpm),
                "rpm_served_beyond_limit": max(0, served_rpm - args.key_rpm),
                "budget_usd": args.key_budget_usd,
                "budget_spent_usd": usage["spent_usd"],
                "budget_held_after_usd": usage["held_usd"],
                "budget_max_bound_usd": max(bounds) if bounds else None,
                "budget_served": sum(g["status"] == 200 for g in by_budget),
                "budget_refused_429": sum(g["status"] == 429 and g.get("code") == "budget_exhausted" for g in by_budget),
                "budget_failed": sum(g["status"] not in (200, 429) for g in by_budget),
                "budget_within": usage["spent_usd"] <= args.key_budget_usd + 1e-12,
                "wall_s": wall,
            })  # fmt: skip
        httpx.post(f"{loop.base_url}/fault", json={"mode": "ok"})  # type: ignore[attr-defined]
        for name in names:
            procs.pop(name).stop()
        return rounds


def key_latency(args: argparse.Namespace, ckpt: Path, tmp: Path, loop: Proc, procs: dict) -> dict:
    """p50 latency and CPU per request without keys and with a key (budget, rpm, tpm all checked)."""
    from router_ml.serving.keys import open_key_store

    catalog = write_catalog(tmp, loop.base_url)  # type: ignore[attr-defined]
    results: dict[str, Any] = {}
    for kind in args.key_stores:
        with store_spec(kind, tmp, "keys") as spec:
            with open_key_store(spec) as store:
                _, secret = store.create_key("bench", budget_usd=1e9, rpm=10**9, tpm=10**12)
            variants = {"no_keys": (["--default-max-tokens", "64"], None),
                        "keys": (["--keys-db", spec, "--default-max-tokens", "64"], secret)}  # fmt: skip
            results[kind] = proxies_in_turns(
                args, ckpt, catalog, "memory", tmp, procs, variants, f"keylat-{kind}"
            )
    return results


def key_check_cost(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    """Median microseconds per request of each step of a keyed request, per key store."""
    from router_ml.backends.catalog import Catalog
    from router_ml.backends.client import BackendClient
    from router_ml.decision.ledger import MemoryLedger
    from router_ml.serving.budget import SpendGuard
    from router_ml.serving.keys import KeyGate, open_key_store

    entry = {"name": "cheap", "kind": "api", "base_url": "http://127.0.0.1:9/v1",
             "prices": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}  # fmt: skip
    client = BackendClient(Catalog.from_entries({"backends": [entry]}))
    guard = SpendGuard(MemoryLedger(), client)
    messages = [{"role": "user", "content": PROMPT.format(i=0)}]
    out: dict[str, dict[str, float]] = {}
    for kind in args.key_stores:
        with store_spec(kind, tmp, "keys-micro") as spec:
            store = open_key_store(spec)
            gate = KeyGate(store)
            _, secret = store.create_key("bench", budget_usd=1e9, rpm=10**9, tpm=10**12, team="t")
            steps: dict[str, list[float]] = {}
            for i in range(args.micro):
                rid, t = f"m{i}", [time.perf_counter()]
                key = gate.authenticate(f"Bearer {secret}")
                t.append(time.perf_counter())
                scopes = gate.scopes(key)
                t.append(time.perf_counter())
                bounds, tokens = guard.plan(["cheap"], {}, messages)
                t.append(time.perf_counter())
                gate.admit(key, rid, tokens)
                t.append(time.perf_counter())
                guard.hold(rid, ["cheap"], bounds, None, scopes)
                t.append(time.perf_counter())
                guard.settle(rid, scopes, 1e-6, "cheap")
                gate.settle(key, rid, 30)
                t.append(time.perf_counter())
                names = ("authenticate", "scopes", "plan", "admit", "hold", "settle")
                for name, a, b in zip(names, t[:-1], t[1:], strict=True):
                    steps.setdefault(name, []).append(b - a)
            store.close()
            skip = min(100, args.micro // 5)  # the first requests warm up
            out[kind] = {k: float(np.median(v[skip:])) * 1e6 for k, v in steps.items()}
            out[kind]["total"] = sum(out[kind].values())
    return out


def reservation_cost(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    """Median microseconds per request of booking alone vs reserve + settle, per ledger kind."""
    from router_ml.backends.catalog import Catalog
    from router_ml.backends.client import BackendClient
    from router_ml.decision.ledger import open_ledger
    from router_ml.serving.budget import SpendGuard

    entry = {"name": "cheap", "kind": "api", "base_url": "http://127.0.0.1:9/v1",
             "prices": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}  # fmt: skip
    client = BackendClient(Catalog.from_entries({"backends": [entry]}))
    messages = [{"role": "user", "content": PROMPT.format(i=0)}]
    out: dict[str, dict[str, float]] = {}
    for kind in args.ledgers:
        with store_spec(kind, tmp, "micro") as spec:
            ledger = open_ledger(spec)
            guard = SpendGuard(ledger, client, budget_usd=1e9, period="day")
            per: dict[str, list[float]] = {"record": [], "reserve+settle": []}
            n, block = 0, 100
            for b in range(2 * max(1, args.micro // block)):
                mode = "record" if b % 2 == 0 else "reserve+settle"
                t = time.perf_counter()
                for _ in range(block):
                    rid = f"m{n}"
                    n += 1
                    if mode == "reserve+settle":
                        guard.reserve(rid, ["cheap"], {}, messages, 1e9)
                    ledger.record(1e-6, "cheap", request_id=rid)
                per[mode].append((time.perf_counter() - t) / block * 1e6)
            ledger.close()
            rec, both = float(np.median(per["record"][1:])), float(np.median(per["reserve+settle"][1:]))
            out[kind] = {"record_us": rec, "reserve_settle_us": both, "added_us": both - rec}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="router checkpoint (default: train a small one once)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-usd", type=float, default=0.01)
    ap.add_argument("--prespent", type=float, default=0.9, help="share of the cap spent before the burst")
    ap.add_argument("--max-tokens", type=int, default=64, help="--default-max-tokens of the replicas")
    ap.add_argument(
        "--delay-s", type=float, default=0.02, help="loopback delay per token (keeps calls in flight)"
    )
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--per-turn", type=int, default=20)
    ap.add_argument(
        "--ledgers", nargs="+", default=["memory", "sqlite", "redis"], choices=["memory", "sqlite", "redis"]
    )
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-edge", action="store_true")
    ap.add_argument("--skip-keys", action="store_true", help="leave out the virtual-key figures (4, 5)")
    ap.add_argument("--skip-micro", action="store_true", help="leave out the in-process reservation cost (2)")
    ap.add_argument("--skip-keys-edge", action="store_true", help="leave out the virtual keys' edge (4)")
    ap.add_argument("--skip-key-latency", action="store_true", help="leave out the key check's latency (6)")
    ap.add_argument("--key-rpm", type=int, default=20, help="the rate-limited key's requests per minute")
    ap.add_argument("--key-budget-usd", type=float, default=0.005, help="the budgeted key's budget per day")
    ap.add_argument("--key-stores", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
    ap.add_argument("--micro", type=int, default=2000, help="requests per ledger kind in-process")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "caps.json"))
    args = ap.parse_args(argv)
    ckpt = ensure_checkpoint(args.ckpt)
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as d, stopping({}) as procs:
        tmp = Path(d)
        lp = free_port()
        loop = Proc("loopback", [sys.executable, "-m", "tests.fakes.loopback", "--port", str(lp)],
                    f"http://127.0.0.1:{lp}/health", tmp / "loopback.log")  # fmt: skip
        loop.base_url = f"http://127.0.0.1:{lp}"  # type: ignore[attr-defined]
        procs["loopback"] = loop
        loop.wait_ready(30)
        report["edge"] = [] if args.skip_edge else edge_of_budget(args, ckpt, tmp, loop, procs)
        if report["edge"]:
            print(f"\n{args.requests} concurrent requests (half pass-through to 'pricey', half routed), "
                  f"{args.replicas} replicas sharing one Redis ledger, cap ${args.budget_usd:g}/day, "
                  f"{args.prespent:.0%} of it spent before:")  # fmt: skip
            print(f"{'round':>5} {'spent $':>10} {'cap $':>8} {'max bound $':>12} {'served':>7} {'429':>5} "
                  f"{'failed':>6} {'<= cap':>7} {'<= cap+bound':>13}")  # fmt: skip
            for r in report["edge"]:
                print(f"{r['round']:>5} {r['spent_usd']:>10.6f} {r['cap_usd']:>8.4f} {r['max_bound_usd'] or 0:>12.6f} "
                      f"{r['served']:>7} {r['refused_429']:>5} {r['failed']:>6} {r['within_cap']!s:>7} "
                      f"{r['within_cap_plus_one_bound']!s:>13}")  # fmt: skip
        if not args.skip_micro:
            report["reservation_cost"] = reservation_cost(args, tmp)
            print("\nwhat a reservation costs, in-process (median us per request over blocks of 100):")
            print(f"{'ledger':>7} {'record':>8} {'reserve+settle':>15} {'added':>8}")
            for kind, c in report["reservation_cost"].items():
                print(
                    f"{kind:>7} {c['record_us']:>8.1f} {c['reserve_settle_us']:>15.1f} {c['added_us']:>+8.1f}"
                )
        if not args.skip_latency:
            report["latency"] = added_latency(args, ckpt, tmp, loop, procs)
            print(f"\nadded latency of reservations (p50 ms, sequential, {args.turns - 1} alternating turns "
                  f"x {args.per_turn} requests per path; the first turn warms up):")  # fmt: skip
            print(f"{'ledger':>7} {'path':>7} {'no cap':>8} {'cap':>8} {'added':>8}   "
                  f"{'CPU ms/req no cap':>17} {'cap':>6}")  # fmt: skip
            for kind, cell in report["latency"].items():
                for path, c in cell.items():
                    print(f"{kind:>7} {path:>7} {c['p50_ms_no_cap']:>8.2f} {c['p50_ms_cap']:>8.2f} "
                          f"{c['added_ms']:>+8.2f}   {c['cpu_ms_no_cap']:>17.2f} {c['cpu_ms_cap']:>6.2f}")  # fmt: skip
        if not args.skip_keys:
            report["keys_edge"] = (
                [] if args.skip_keys_edge else keys_at_the_edge(args, ckpt, tmp, loop, procs)
            )
            print(f"\nvirtual keys: {args.requests} concurrent requests per key (half pass-through to 'pricey', "
                  f"half routed), {args.replicas} replicas sharing one Redis key store:")  # fmt: skip
            print(f"{'round':>5} {'rpm':>4} {'served':>7} {'429':>5} {'failed':>6} {'beyond':>7}   "
                  f"{'budget $':>9} {'spent $':>10} {'max bound $':>12} {'served':>7} {'429':>5} {'failed':>6} {'<= budget':>9}")  # fmt: skip
            for r in report["keys_edge"]:
                print(f"{r['round']:>5} {r['rpm']:>4} {r['rpm_served']:>7} {r['rpm_refused_429']:>5} {r['rpm_failed']:>6} "
                      f"{r['rpm_served_beyond_limit']:>7}   {r['budget_usd']:>9.4f} {r['budget_spent_usd']:>10.6f} "
                      f"{r['budget_max_bound_usd'] or 0:>12.6f} {r['budget_served']:>7} {r['budget_refused_429']:>5} "
                      f"{r['budget_failed']:>6} {r['budget_within']!s:>9}")  # fmt: skip
            report["key_check_cost"] = key_check_cost(args, tmp)
            print(
                "\nwhat a key check costs, in-process (median us per request; a key with a budget, a team, rpm, tpm):"
            )
            names = ("authenticate", "scopes", "plan", "admit", "hold", "settle", "total")
            print(f"{'store':>7} " + " ".join(f"{n:>12}" for n in names))
            for kind, c in report["key_check_cost"].items():
                print(f"{kind:>7} " + " ".join(f"{c[n]:>12.1f}" for n in names))
            if args.skip_key_latency:
                report["keys_latency"] = {}
            else:
                report["keys_latency"] = key_latency(args, ckpt, tmp, loop, procs)
            print(f"\nadded latency of the key check + budget reservation + rate admission (p50 ms, sequential, "
                  f"{args.turns - 1} alternating turns x {args.per_turn} requests per path):")  # fmt: skip
            print(f"{'store':>7} {'path':>7} {'no keys':>8} {'keys':>8} {'added':>8}   "
                  f"{'CPU ms/req no keys':>18} {'keys':>6}")  # fmt: skip
            for kind, cell in report["keys_latency"].items():
                for path, c in cell.items():
                    print(f"{kind:>7} {path:>7} {c['p50_ms_no_keys']:>8.2f} {c['p50_ms_keys']:>8.2f} "
                          f"{c['added_ms']:>+8.2f}   {c['cpu_ms_no_keys']:>18.2f} {c['cpu_ms_keys']:>6.2f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
