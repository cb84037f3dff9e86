"""Paired overhead benchmark at one request in flight: direct, pass-through and routed calls taken
in turns, so that each routed call is compared with the calls made right before it.

    python -m experiments.bench_paired                          # kNN router, 20 s per mode
    python -m experiments.bench_paired --head taskmix --rounds 3

``bench_proxy`` measures each path in its own 3-second cell; on a shared 2-core machine the speed
of the whole box drifts between cells (the encoder alone ranged 5.0-6.3 ms p50 across runs of one
day), and that drift lands in the "+p50 - encoder" figure as if the proxy had caused it. Here one
loop sends direct, pass-through and routed requests in turn (one keep-alive connection each, the
same servers and load generator as ``bench_proxy``), so that slow spells hit all three alike, and
reports medians of per-round differences:

- ``pass +p50``: pass-through latency minus the direct call of the same round;
- ``routed +p50``: routed latency minus the same round's direct call;
- ``routed - enc``: that minus the encoder time the proxy reported for this very request
  (``x-router-encode-ms``), i.e. what routing adds besides the encoder (the target is <= 1 ms);
- ``of it deciding``: the proxy's own decision time beyond the encoder (``x-router-decision-ms``
  minus ``x-router-encode-ms``); the rest is the HTTP path and waking the idle backend and client.

Prints one line per round and mode and the median over rounds; writes
``outputs/bench/paired.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.bench_proxy import one_request, start_servers
from experiments.bench_servers import BENCH_HEADS, ROOT, ensure_checkpoint, stopping
from router_ml.backends.http11 import FastHTTP

ORDER = ("direct", "rml_pass", "rml_routed")


async def paired_round(calls: dict, stream: bool, warmup: float, duration: float, tag: str) -> dict:
    """One loop of direct / pass-through / routed requests in turn; per-round paired differences."""
    clients = {name: FastHTTP() for name in ORDER}
    rows: list[tuple[float, ...]] = []  # direct, pass, routed, routed's encoder, its decision (s)
    errors = 0
    t_meas = time.perf_counter() + warmup
    t_end = t_meas + duration
    i = 0
    try:
        while (now := time.perf_counter()) < t_end:
            got = []
            for name in ORDER:
                marker = f"p{tag}{name[-1]}n{i}x"
                try:
                    dt, text, headers = await one_request(clients[name], calls[name], marker, stream)
                except Exception:  # counted; the round is dropped
                    errors += 1
                    break
                if marker not in text:
                    errors += 1
                    break
                got.append((dt, headers.get("x-router-encode-ms"), headers.get("x-router-decision-ms")))
            i += 1
            if len(got) == 3 and now >= t_meas and got[2][1] is not None:
                enc_s, decide_s = float(got[2][1]) / 1000, float(got[2][2]) / 1000
                rows.append((got[0][0], got[1][0], got[2][0], enc_s, decide_s))
    finally:
        for client in clients.values():
            await client.aclose()
    a = np.asarray(rows) * 1000  # ms
    return {
        "rounds": len(rows),
        "errors": errors,
        "direct_p50_ms": float(np.median(a[:, 0])),
        "pass_added_p50_ms": float(np.median(a[:, 1] - a[:, 0])),
        "routed_added_p50_ms": float(np.median(a[:, 2] - a[:, 0])),
        "encode_p50_ms": float(np.median(a[:, 3])),
        "routed_added_minus_encode_p50_ms": float(np.median(a[:, 2] - a[:, 0] - a[:, 3])),
        "routed_added_minus_encode_p90_ms": float(np.percentile(a[:, 2] - a[:, 0] - a[:, 3], 90)),
        # the proxy's own deciding beyond the encoder (x-router-decision-ms - x-router-encode-ms)
        "decide_minus_encode_p50_ms": float(np.median(a[:, 4] - a[:, 3])),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="router checkpoint (default: bench_proxy's small router)")
    ap.add_argument("--head", choices=BENCH_HEADS, default="knn", help="quality head of that router")
    ap.add_argument("--rounds", type=int, default=3, help="measurement rounds per mode (a median is taken)")
    ap.add_argument("--duration", type=float, default=6.0, help="measured seconds per round")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "paired.json"))
    args = ap.parse_args(argv)
    import uvloop

    ckpt = ensure_checkpoint(args.ckpt, args.head)
    results: dict[str, list[dict]] = {"nonstream": [], "stream": []}
    with tempfile.TemporaryDirectory(prefix="bench-paired-") as tmpdir, stopping({}) as procs:
        calls = start_servers(ckpt, Path(tmpdir), None, procs)
        gc.collect()
        gc.freeze()
        for r in range(args.rounds):
            for mode in results:
                tag = f"{r}{mode[0]}"
                run = paired_round(calls, mode == "stream", args.warmup, args.duration, tag)
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    res = runner.run(run)
                results[mode].append(res)
                print(f"round {r} {mode:<9} {json.dumps(res)}", flush=True)
    summary = {
        mode: {k: float(np.median([x[k] for x in rows])) for k in rows[0] if k.endswith("_ms")}
        for mode, rows in results.items()
    }
    print(f"\nmedians over {args.rounds} rounds (ms; differences paired within each round):")
    print(
        f"{'mode':<10}{'direct':>8}{'pass +p50':>11}{'routed +p50':>13}{'encoder':>9}{'routed-enc':>12}"
        f"{'of it deciding':>16}"
    )
    for mode, s in summary.items():
        print(
            f"{mode:<10}{s['direct_p50_ms']:>8.2f}{s['pass_added_p50_ms']:>11.2f}{s['routed_added_p50_ms']:>13.2f}"
            f"{s['encode_p50_ms']:>9.2f}{s['routed_added_minus_encode_p50_ms']:>12.2f}"
            f"{s['decide_minus_encode_p50_ms']:>16.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ckpt": os.path.relpath(ckpt, ROOT), "rounds": args.rounds, "duration_s": args.duration}
    out.write_text(json.dumps({"meta": meta, "rounds": results, "median": summary}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
