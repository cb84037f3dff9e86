"""Kill the vLLM API server mid-stream, N tries: does the stream finish on llama.cpp, and is nothing left?

    python -m experiments.bench_kill_local [--tries 10] [--ckpt DIR] [--max-tokens 160] [--kill-after 3]

Real servers, SmolLM2-135M on both (``bash scripts/setup_local_models.sh``; ``$ROUTER_ML_VLLM_VENV``,
``$ROUTER_ML_LLAMACPP_VENV``, ``$ROUTER_ML_MODELS_DIR``): llama.cpp is started once, the proxy
(in-process, uvicorn) once, and per try the vLLM backend is started with ``models up`` (its PID file
records the API server's PID, process group and start time). llama.cpp's prefill speed is measured
once at start (:func:`measure_prefill`) and set as its ``prefill_tokens_per_s``, as an operator
would: the resumed stream's first-token deadline is its 5 s plus the continuation's prefill at that
speed. One routed answer is streamed through
the proxy with the real ``openai`` client; after ``--kill-after`` content chunks the API server's
recorded PID gets SIGKILL (its engine process would live on in the group: the watchdog started
beside the server stops it); the stream is read to its end. The seconds until the group is empty,
and the processes of the group still there when the stream ended are measured, then ``models
down`` stops whatever is left, and they are counted again (must be 0).

Prints per try and over all tries: streams completed on the fallback (and how many got new text
from it), seconds from the kill to the first llama.cpp chunk (its first token, or its end when all
it said repeated the partial answer) (p50 / max), seconds until vLLM's group was empty, processes left
after ``models down``, and whether the booking and ``/metrics`` tell the truth (the ledger row names the
decided model and llama.cpp as the serving backend with a cost > 0; the request is counted 200).
Real servers on a shared CPU are slow: expect about a minute per try, most of it vLLM's start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm import tqdm

SERVED_ID = "smollm2-135m"
VLLM = "smollm2-vllm"
LLAMACPP = "smollm2-llamacpp"
VLLM_ARGS = ["--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]
PROMPT = "Write a long, moving poem about the sea at night, with at least twelve stanzas."
MODEL = "router:utility:0"  # quality first: the routed model does not depend on prices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models_dir() -> Path:
    return Path(os.environ.get("ROUTER_ML_MODELS_DIR") or Path(__file__).resolve().parents[1] / "models")


def catalog_entries(
    vllm_port: int, llamacpp_port: int, llamacpp_prefill: float | None = None
) -> list[dict[str, Any]]:
    """The two local backends, as an operator would write them (llama.cpp: a 5 s first-token
    deadline; ``llamacpp_prefill``: its measured prefill tokens/s, which stretches the deadline of
    a resumed stream by the continuation's prefill)."""
    return [
        {"name": VLLM, "kind": "vllm", "base_url": f"http://127.0.0.1:{vllm_port}/v1", "served_model_id": SERVED_ID,
         "prices": {"gpu_hour_usd": 0.5, "decode_tokens_per_s": 250}, "latency": {"ttft_s": 0.1, "tokens_per_s": 33},
         "first_token_timeout_s": 60, "timeout_s": 300,
         "launch": {"engine": "vllm", "model": str(models_dir() / SERVED_ID), "port": vllm_port, "args": VLLM_ARGS}},
        {"name": LLAMACPP, "kind": "vllm", "base_url": f"http://127.0.0.1:{llamacpp_port}/v1",
         "served_model_id": SERVED_ID, "prices": {"gpu_hour_usd": 0.1, "decode_tokens_per_s": 155},
         "latency": {"ttft_s": 0.04, "tokens_per_s": 120}, "first_token_timeout_s": 5, "timeout_s": 300,
         "launch": {"engine": "llamacpp", "model": str(models_dir() / f"{SERVED_ID}.gguf"), "port": llamacpp_port},
         **({"prefill_tokens_per_s": llamacpp_prefill} if llamacpp_prefill else {})},
    ]  # fmt: skip


def measure_prefill(base_url: str, tries: int = 3) -> float:
    """Prefill tokens/s of a running server, as an operator measures it for ``prefill_tokens_per_s``:
    the slowest of ``tries`` one-token answers to a continuation-sized prompt (prompt tokens over
    seconds). Each prompt starts differently, so that no server's prompt cache serves it."""
    import httpx

    text = PROMPT + " " + "The waves roll in under a silver moon, and the night wind sings. " * 6
    rates = []
    for i in range(tries):
        body = {"model": SERVED_ID, "max_tokens": 1,
                "messages": [{"role": "user", "content": f"Request {i + 1} of {tries}, {time.time():.6f}. {text}"}]}  # fmt: skip
        t = time.perf_counter()
        resp = httpx.post(f"{base_url}/chat/completions", json=body, timeout=300)
        resp.raise_for_status()
        rates.append(resp.json()["usage"]["prompt_tokens"] / (time.perf_counter() - t))
    return min(rates)


class KillHarness:
    """llama.cpp and the proxy, started once; :meth:`one_try` starts vLLM, kills it mid-stream, stops it.

    ``ckpt``: the router checkpoint the proxy serves; the model a quality-first request is routed
    to is aliased to vLLM, every other one to llama.cpp (next in that request's chain).
    """

    def __init__(self, ckpt: str | Path, state: str | Path, metrics_poll_s: float = 0.5) -> None:
        self.ckpt, self.state, self.metrics_poll_s = Path(ckpt), Path(state), metrics_poll_s
        self.llamacpp: Any = None
        self.url = ""
        self.engine: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> KillHarness:
        import uvicorn

        from router_ml.backends.catalog import Catalog
        from router_ml.backends.local.local_server import LocalServer
        from router_ml.decision.ledger import open_ledger
        from router_ml.router import LearnedRouter
        from router_ml.serving.engine import RoutingEngine
        from router_ml.serving.engine_support import load_policy_configs
        from router_ml.serving.proxy import ProxySettings, create_app

        ports = _free_port(), _free_port()
        first = Catalog.from_entries({"backends": catalog_entries(*ports)})
        self.llamacpp = LocalServer.from_backend(
            first.get(LLAMACPP), log_path=self.state / "logs" / f"{LLAMACPP}.log"
        ).start()
        self.llamacpp.wait_ready(timeout=300)
        self.llamacpp_prefill = measure_prefill(self.llamacpp.base_url)
        self.catalog = Catalog.from_entries({"backends": catalog_entries(*ports, self.llamacpp_prefill)})
        router, policies = LearnedRouter.from_pretrained(self.ckpt), load_policy_configs()
        # the model the benchmark's request is routed to is served by vLLM, every other one by
        # llama.cpp, so that llama.cpp is next in the request's chain (a quality-first decision
        # does not depend on where the models are served)
        probe = RoutingEngine(router, self.catalog, policies, aliases=dict.fromkeys(router.models, VLLM))
        _, layer, constraints = probe.resolve(MODEL)
        decided = asyncio.run(probe.decide(PROMPT, layer, constraints)).model
        probe.decider.close()
        aliases = {m: VLLM if m == decided else LLAMACPP for m in router.models}
        self.engine = RoutingEngine(
            router,
            self.catalog,
            policies,
            aliases=aliases,
            ledger=open_ledger(str(self.state / "ledger.sqlite")),
        )
        port = _free_port()
        app = create_app(self.engine, ProxySettings(metrics_poll_s=self.metrics_poll_s))
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        from router_ml.backends.local.launcher import models_down

        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)
        if (self.state / "servers.json").is_file():
            models_down(state=self.state)
        if self.llamacpp is not None:
            self.llamacpp.stop()

    def requests_total(self, status: str) -> float:
        import httpx

        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if (
                line.startswith("router_ml_requests_total{")
                and 'route="router"' in line
                and f'status="{status}"' in line
            ):
                return float(line.split()[-1])
        return 0.0

    def one_try(self, max_tokens: int = 160, kill_after: int = 3) -> dict[str, Any]:
        """Start vLLM, stream through the proxy, SIGKILL the recorded API-server PID after
        ``kill_after`` content chunks, finish the stream, count the group's survivors, ``models down``."""
        import httpx
        import openai

        from router_ml.backends.local.launcher import models_down, models_up
        from router_ml.backends.local.local_server import group_members

        t = time.perf_counter()
        (server,) = models_up(self.catalog, [VLLM], state=self.state, timeout=600)
        ready_s = time.perf_counter() - t
        rec = json.loads((self.state / "servers.json").read_text())[VLLM]
        pgid, ticks = int(rec["pgid"]), rec["start_ticks"]
        group_at_start = len(group_members(pgid, ticks))
        ok_before, failed_before = self.requests_total("200"), self.requests_total("502")
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600)
        out: dict[str, Any] = {"ready_s": round(ready_s, 1), "group_at_start": group_at_start}
        text, models, killed_at, first_fallback, error = [], [], None, None, None
        emptied: list[float] = []  # seconds from the kill until no process of the group was left

        def watch_group() -> None:
            while group_members(pgid, ticks) and time.perf_counter() - killed_at < 120:
                time.sleep(0.05)
            emptied.append(time.perf_counter() - killed_at)

        watcher = threading.Thread(target=watch_group, daemon=True)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, stream=True, max_tokens=max_tokens,
            messages=[{"role": "user", "content": PROMPT}],
        )  # fmt: skip
        decided = raw.headers.get("x-router-model")
        out["chain"] = [
            raw.headers.get("x-router-served-model"),
            *raw.headers.get("x-router-fallbacks", "").split(","),
        ]
        try:
            for chunk in raw.parse():
                if not chunk.choices:
                    continue
                piece = chunk.choices[0].delta.content or ""
                text.append(piece)
                models.append(chunk.model)
                if (
                    killed_at is None
                    and piece
                    and sum(1 for p in text if p) >= kill_after
                    and chunk.model == VLLM
                ):
                    os.kill(server.pid, signal.SIGKILL)  # the API server's recorded PID, as an operator would
                    killed_at = time.perf_counter()
                    watcher.start()
                if killed_at is not None and first_fallback is None and chunk.model == LLAMACPP:
                    first_fallback = time.perf_counter() - killed_at  # its first chunk: text or the end
        except openai.APIError as err:
            error = str(err)[:300]
        orphans = group_members(pgid, ticks)  # what the kill left running when the stream ended
        if killed_at is not None:
            watcher.join(timeout=130)
        time.sleep(self.metrics_poll_s * 3)
        health = httpx.get(f"{self.url}/health").json()
        t = time.perf_counter()
        stopped = models_down([VLLM], state=self.state)
        down_s = time.perf_counter() - t
        left = group_members(pgid, ticks)
        rows = self.engine.ledger.entries()
        row = rows.iloc[-1] if len(rows) else None
        out.update(
            killed=killed_at is not None,
            # vLLM had sent the whole answer before the kill reached it (a fast server, a slow
            # reader): nothing was cut, so there was nothing to resume
            raced=killed_at is not None and error is None and bool(models) and models[-1] == VLLM,
            completed=error is None and bool(models) and models[-1] == LLAMACPP,
            error=error,
            first_fallback_token_s=None if first_fallback is None else round(first_fallback, 3),
            fallback_chars=sum(len(p) for p, m in zip(text, models, strict=True) if m == LLAMACPP),
            chars=len("".join(text)),
            orphans_at_stream_end=len(orphans),
            group_empty_after_kill_s=round(emptied[0], 2) if emptied else None,
            stopped_by_models_down=stopped,
            models_down_s=round(down_s, 2),
            left_after_models_down=len(left),
            health_after_kill=(health.get("checks", {}).get(VLLM) or {}).get("status"),
            booked_model=None if row is None else row["model"],
            decided_model=decided,
            booked_backend=None if row is None else row["backend"],
            booked_usd=None if row is None else float(row["cost_usd"]),
            counted_200=self.requests_total("200") - ok_before,
            counted_502=self.requests_total("502") - failed_before,
        )
        return out


@contextmanager
def harness(ckpt: str | Path, state: str | Path | None = None) -> Iterator[KillHarness]:
    with tempfile.TemporaryDirectory(prefix="bench-kill-") as tmp:
        h = KillHarness(ckpt, state or tmp)
        try:
            yield h.start()
        finally:
            h.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--ckpt", default=None, help="router checkpoint (default: the benchmarks' small router)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--kill-after", type=int, default=3, help="content chunks before the kill")
    ap.add_argument("--out", default=None, help="write every try as JSON here")
    args = ap.parse_args(argv)
    from experiments.bench_servers import ensure_checkpoint

    ckpt = ensure_checkpoint(args.ckpt)
    tries = []
    with harness(ckpt) as h:
        for _ in tqdm(range(args.tries), desc="kill vLLM mid-stream"):
            got = h.one_try(args.max_tokens, args.kill_after)
            tqdm.write(json.dumps(got))
            tries.append(got)
    killed = [t for t in tries if t["killed"] and not t["raced"]]
    firsts = [t["first_fallback_token_s"] for t in killed if t["first_fallback_token_s"] is not None]
    truthful = [
        t for t in killed
        if t["booked_backend"] == LLAMACPP and t["booked_model"] == t["decided_model"] and (t["booked_usd"] or 0) > 0
        and t["counted_200"] == 1
    ]  # fmt: skip
    print(
        f"\nllama.cpp prefill measured at start: {h.llamacpp_prefill:.0f} tokens/s (its prefill_tokens_per_s)"
    )
    print(
        f"tries: {len(tries)}, killed mid-stream: {len(killed)}, "
        f"answer complete before the kill landed: {sum(t['raced'] for t in tries)}"
    )
    print(f"streams completed on the fallback: {sum(t['completed'] for t in killed)}/{len(killed)}")
    print(
        f"  of which the fallback added new text: {sum(t['completed'] and t['fallback_chars'] > 0 for t in killed)}"
        " (SmolLM2-135M often answers 'continue' by repeating the partial text, which the overlap cut removes)"
    )
    if firsts:
        print(f"time to the first fallback token after the kill: p50 {statistics.median(firsts):.2f} s, "
              f"max {max(firsts):.2f} s")  # fmt: skip
    empty = [t["group_empty_after_kill_s"] for t in killed if t["group_empty_after_kill_s"] is not None]
    if empty:
        print(f"vLLM's group empty after the kill (its watchdog): p50 {statistics.median(empty):.2f} s, "
              f"max {max(empty):.2f} s")  # fmt: skip
    print(
        f"processes of the group when the stream ended: max {max(t['orphans_at_stream_end'] for t in tries)}"
    )
    print(f"processes left after models down: {sum(t['left_after_models_down'] for t in tries)} (must be 0)")
    print(
        f"/health marked the killed server: {sum(t['health_after_kill'] not in (None, 'ok') for t in killed)}/{len(killed)}"
    )
    print(f"booked (decided model, llama.cpp, cost > 0) and counted 200: {len(truthful)}/{len(killed)}")
    if args.out:
        Path(args.out).write_text(json.dumps(tries, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
