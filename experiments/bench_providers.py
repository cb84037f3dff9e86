"""Translation overhead per request: openai vs anthropic vs azure pass-through on loopback servers.

    python -m experiments.bench_providers                      # 5 rounds x 200 requests per api
    python -m experiments.bench_providers --rounds 9 --requests 500

Three loopback servers, one per wire format (:mod:`tests.fakes.loopback` for Chat Completions,
:mod:`tests.fakes.anthropic_server` for the Messages API, :mod:`tests.fakes.azure_server` for Azure
OpenAI), run in a child process; this process sends one request at a time through
:class:`~router_ml.backends.client.BackendClient` to the backend named ``openai``, ``anthropic`` or
``azure``: the pass-through path of the proxy below its ASGI layer, which is the same for every
api. The apis take turns (openai, anthropic, azure, openai, ...) for ``--rounds`` rounds, so that
load from other processes falls on all three alike. Printed per api, non-stream and stream (to the
last chunk): p50 latency (ms) and the client's CPU per request (us, from ``time.process_time``:
robust on a shared machine), each also as the difference to openai; and, apart, the CPU of the
translation alone (request -> Messages body, answer -> chat.completion, a 14-event stream -> chunks;
best of 5 timeit runs). The fakes' own work differs (the Anthropic fake validates more), which the
latency includes and the client CPU does not. Writes ``outputs/bench/providers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

APIS = ("openai", "anthropic", "azure")
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Summarise in one line: the meeting moved to Thursday at ten."},
]


def _serve(ports: Any, stop: Any) -> None:
    """The child process: the three loopback servers on one event loop until ``stop`` is set."""
    from tests.fakes.anthropic_server import AnthropicServer
    from tests.fakes.azure_server import AzureServer
    from tests.fakes.loopback import LoopbackServer

    async def main() -> None:
        servers = [LoopbackServer(), AnthropicServer(api_key="bench-ant"),
                   AzureServer(deployments={"chat": "gpt-4o"}, api_key="bench-az")]  # fmt: skip
        for s in servers:
            await s.start()
        ports.put([s.port for s in servers])
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for s in servers:
            await s.stop()

    asyncio.run(main())


def _catalog(ports: list[int]) -> Any:
    from router_ml.backends.catalog import Catalog

    prices = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    base = "http://127.0.0.1"
    return Catalog.from_entries([
        {"name": "openai", "kind": "api", "base_url": f"{base}:{ports[0]}/v1", "prices": prices},
        {"name": "anthropic", "kind": "api", "api": "anthropic", "base_url": f"{base}:{ports[1]}",
         "api_key_env": "BENCH_ANT_KEY", "max_tokens": 256, "prices": prices},
        {"name": "azure", "kind": "api", "api": "azure", "base_url": f"{base}:{ports[2]}",
         "api_key_env": "BENCH_AZ_KEY", "deployment": "chat", "api_version": "2024-10-21", "prices": prices},
    ])  # fmt: skip


async def _turn(client: Any, api: str, n: int, stream: bool) -> tuple[list[float], float]:
    """``n`` sequential requests: (latencies in s, client CPU per request in s)."""
    lat = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        if stream:
            s = await client.stream(api, {"messages": MESSAGES})
            async for _ in s:
                pass
        else:
            await client.chat(api, {"messages": MESSAGES})
        lat.append(time.perf_counter() - t)
    return lat, (time.process_time() - cpu0) / n


def _translation_us() -> dict[str, float]:
    """CPU of the Anthropic translation alone, per request (us, best of 5)."""
    from router_ml.backends import anthropic

    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
              "content": [{"type": "text", "text": "The meeting moved to Thursday at ten."}],
              "usage": {"input_tokens": 20, "output_tokens": 9}}  # fmt: skip
    events = [{"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 20}}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " word"}}
                for _ in range(9)),
              {"type": "content_block_stop", "index": 0},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
              {"type": "message_stop"}]  # fmt: skip

    def stream() -> None:
        t = anthropic.StreamTranslator()
        for e in events:
            t.feed(e)

    payload = {"messages": MESSAGES}
    cases = {
        "request": lambda: anthropic.to_messages(payload, "m", 256, False),
        "answer": lambda: anthropic.to_chat_completion(answer),
        "stream_14_events": stream,
    }
    n = 2000
    return {k: min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6 for k, f in cases.items()}


async def _bench(ports: list[int], rounds: int, n: int) -> dict[str, Any]:
    from tqdm import tqdm

    from router_ml.backends.client import BackendClient

    os.environ["BENCH_ANT_KEY"], os.environ["BENCH_AZ_KEY"] = "bench-ant", "bench-az"
    runs: dict[str, dict[str, list]] = {
        f"{a}/{m}": {"lat": [], "cpu": []} for a in APIS for m in ("chat", "stream")
    }
    async with BackendClient(_catalog(ports)) as client:
        for api in APIS:  # warm-up: connections, imports
            await _turn(client, api, 20, False)
            await _turn(client, api, 20, True)
        for _ in tqdm(range(rounds), desc="rounds"):
            for mode in ("chat", "stream"):
                for api in APIS:
                    lat, cpu = await _turn(client, api, n, mode == "stream")
                    runs[f"{api}/{mode}"]["lat"] += lat
                    runs[f"{api}/{mode}"]["cpu"].append(cpu)
    return {k: {"p50_ms": statistics.median(v["lat"]) * 1e3, "cpu_us": statistics.median(v["cpu"]) * 1e6,
                "requests": len(v["lat"])} for k, v in runs.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200, help="requests per api per round and mode")
    ap.add_argument("--out", default="outputs/bench/providers.json")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    ports_q, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_serve, args=(ports_q, stop), daemon=True)
    child.start()
    try:
        ports = ports_q.get(timeout=60)
        figures = asyncio.run(_bench(ports, args.rounds, args.requests))
    finally:
        stop.set()
        child.join(timeout=10)
        if child.is_alive():
            child.terminate()
    translation = _translation_us()
    print(f"\nper request, one at a time, {args.rounds} rounds x {args.requests} (median over all requests)")
    print(f"{'api':<10}{'mode':<8}{'p50 ms':>9}{'vs openai':>11}{'client CPU us':>15}{'vs openai':>11}")
    for mode in ("chat", "stream"):
        ref = figures[f"openai/{mode}"]
        for api in APIS:
            f = figures[f"{api}/{mode}"]
            print(f"{api:<10}{mode:<8}{f['p50_ms']:>9.3f}{f['p50_ms'] - ref['p50_ms']:>+11.3f}"
                  f"{f['cpu_us']:>15.0f}{f['cpu_us'] - ref['cpu_us']:>+11.0f}")  # fmt: skip
    print(
        "anthropic translation alone (us per request): "
        + ", ".join(f"{k} {v:.1f}" for k, v in translation.items())
    )
    out = {
        "figures": figures,
        "translation_us": translation,
        "rounds": args.rounds,
        "requests": args.requests,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
