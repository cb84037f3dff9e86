"""Memory of the in-memory spend ledger over a long run: RSS after 10k, 100k, 1M and 3M records.

    python -m experiments.bench_ledger_memory                  # ~1 min
    python -m experiments.bench_ledger_memory --at 10000 100000 --sessions 20

Records arrive as a proxy books them: increasing timestamps (``--per-hour`` calls an hour), a
request id each, ``--sessions`` sessions and ``--models`` models. After each checkpoint the script
collects garbage and prints the process's resident memory (``/proc/self/status``), its growth since
the ledger was created, per record, and the time ``spent()`` over the current day takes (the
question every budgeted decision asks). A ledger that keeps every row grows without bound; one
that keeps per-hour aggregates stays flat once its id memory (``dedupe_ids``) is full.
Any ledger with the ``record``/``spent`` interface can be measured: the script only uses those.
"""

from __future__ import annotations

import argparse
import gc
import time

from tqdm import tqdm

from router_ml.decision.ledger import MemoryLedger, period_start


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--at", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 3_000_000],
                    help="record counts to report at")  # fmt: skip
    ap.add_argument("--per-hour", type=int, default=20_000, help="calls booked per hour")
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--models", type=int, default=5)
    args = ap.parse_args(argv)
    checkpoints = sorted(args.at)
    gc.collect()
    base = rss_kb()
    ledger = MemoryLedger()
    t0 = 1_700_000_000.0
    step = 3600.0 / args.per_hour
    print(f"{'records':>10} {'RSS MB':>8} {'growth MB':>10} {'B/record':>9} {'spent(day) us':>14}")
    done = 0
    for target in checkpoints:
        for i in tqdm(range(done, target), desc=f"to {target:,}", leave=False, mininterval=1.0):
            ledger.record(1e-4, f"m{i % args.models}", request_id=f"req-{i:012d}", ts=t0 + i * step,
                          session=f"s{i % args.sessions}")  # fmt: skip
        done = target
        gc.collect()
        rss = rss_kb()
        since = period_start("day", t0 + done * step)
        t = time.perf_counter()
        for _ in range(1000):
            ledger.spent(since=since)
        spent_us = (time.perf_counter() - t) * 1000
        print(f"{done:>10,} {rss / 1024:>8.1f} {(rss - base) / 1024:>10.1f} {(rss - base) * 1024 / done:>9.0f} "
              f"{spent_us:>14.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
