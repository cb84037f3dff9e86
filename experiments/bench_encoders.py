"""Benchmark of the encoders and the embedding cache (prints the figures).

    .venv/bin/python -m experiments.bench_encoders              # full run (~4-5 min on 2 CPU cores)
    .venv/bin/python -m experiments.bench_encoders --repeats 30 # quicker, noisier

Prints: one-prompt encode latency p50/p99 (ms) for a short (~15 words) and a ~200-word prompt,
through the fast path (1 torch thread, the default for small calls; and 2 threads) and the plain
``SentenceTransformer.encode`` path; batched throughput (prompts/s) on short prompts and on 500
llmrouter_ulab prompts (fast path with automatic / 1 / 2 threads, ``SentenceTransformer.encode``
with 1 / 2 threads); cold (encode + write) vs cached (read) time for those 500 through
``CachedEncoder``; static (model2vec) encoder throughput. The host load average is printed too:
on a shared machine other processes' work slows every figure down.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from router_ml.embeddings import CachedEncoder, SentenceTransformerEncoder, StaticEncoder

SHORT = "Summarize the following email thread about the quarterly budget review in three bullet points."
SUBJECTS = ["the budget", "a python script", "my essay", "this contract", "the rust compiler", "a poem"]
VERBS = ["Summarize", "Explain", "Fix the bugs in", "Translate into French", "Critique", "Rewrite"]


def llmrouter_prompts(n: int) -> list[str]:
    """The first ``n`` prompts of llmrouter_ulab by prompt id, i.e. in file order (real routing
    traffic; the data folder's copy, else the one shipped in the package)."""
    from router_ml.data.adapters import load_source

    table = load_source("llmrouter", costs=False).drop_duplicates("prompt_id")
    return table.sort_values("prompt_id", kind="stable")["prompt"].tolist()[:n]


def short_prompts(n: int) -> list[str]:
    """``n`` distinct ~15-word prompts."""
    return [
        f"{VERBS[i % 6]} {SUBJECTS[(i // 6) % 6]} in {3 + i % 5} short points for reader number {i}, please."
        for i in range(n)
    ]


def long_prompt(prompts: list[str]) -> str:
    """A real prompt of 170-230 words if there is one, else real prompts joined to ~200 words."""
    for p in prompts:
        if 170 <= len(p.split()) <= 230:
            return p
    return " ".join(" ".join(prompts).split()[:200])


def latency(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(p50, p99) milliseconds of ``fn()`` after a warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def throughput(fn: Callable[[list[str]], object], texts: list[str]) -> float:
    """Prompts per second of one ``fn(texts)`` call (after a small warm-up)."""
    fn(texts[:8])
    t0 = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=100, help="calls per latency figure")
    ap.add_argument("--n-short", type=int, default=1024, help="short prompts for batched throughput")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    real = llmrouter_prompts(500)
    long = long_prompt(real)
    enc = SentenceTransformerEncoder()
    t0 = time.perf_counter()
    enc.encode([SHORT])
    print(f"MiniLM load + first encode: {time.perf_counter() - t0:.2f} s")
    fast_kind = "fused BERT" if enc._fast is not None and enc._fast[1].__name__ == "fast" else "HF forward"
    print(f"\none-prompt latency, ms (p50 / p99 over {args.repeats} calls); fast path = {fast_kind}")
    print(f"  {'prompt':<22}{'fast 1 thread':>18}{'fast 2 threads':>18}{'ST.encode':>18}")
    for name, text in (
        (f"short ({len(SHORT.split())} words)", SHORT),
        (f"long ({len(long.split())} words)", long),
    ):
        figs = []
        for threads, plain in ((None, False), (2, False), (None, True)):
            enc.num_threads = threads
            fn = enc.encode_sentence_transformers if plain else enc.encode
            p50, p99 = latency(lambda fn=fn, text=text: fn([text]), args.repeats)
            figs.append(f"{p50:6.2f} / {p99:6.2f}")
        enc.num_threads = None
        print(f"  {name:<22}" + "".join(f"{f:>18}" for f in figs))

    bs = args.batch_size
    shorts = short_prompts(args.n_short)
    print(f"\nbatched throughput, prompts/s (batch_size={bs})")
    cols = ("fast auto", "fast 1 thr", "fast 2 thr", "ST 1 thr", "ST 2 thr")
    print(f"  {'prompts':<16}" + "".join(f"{c:>11}" for c in cols))
    for name, texts in ((f"{len(shorts)} short", shorts), (f"{len(real)} llmrouter", real)):
        figs = []
        for plain, threads in ((False, None), (False, 1), (False, 2), (True, 1), (True, 2)):
            enc.num_threads = threads
            fn = enc.encode_sentence_transformers if plain else enc.encode
            figs.append(throughput(lambda t, fn=fn: fn(t, batch_size=bs, show_progress=False), texts))
        enc.num_threads = None
        print(f"  {name:<16}" + "".join(f"{f:>11.1f}" for f in figs))

    with tempfile.TemporaryDirectory() as tmp:
        cached = CachedEncoder(enc, cache_dir=tmp)
        t0 = time.perf_counter()
        cold = cached.encode(real, batch_size=bs, show_progress=False)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = cached.encode(real, batch_size=bs, show_progress=False)
        t_warm = time.perf_counter() - t0
        one = latency(lambda: cached.encode([real[0]]), args.repeats)
        cached.close()
    assert np.array_equal(cold, warm)
    print(f"\ncache, {len(real)} llmrouter prompts: cold {t_cold:.2f} s (encode + write)")
    print(f"  cached (read) {t_warm * 1e3:.1f} ms")
    print(f"  one cached prompt: p50 {one[0]:.3f} ms, p99 {one[1]:.3f} ms")

    static = StaticEncoder()
    t0 = time.perf_counter()
    static.encode([SHORT])
    print(f"\nstatic (model2vec, dim {static.dim}) load + first encode: {time.perf_counter() - t0:.2f} s")
    p50, p99 = latency(lambda: static.encode([SHORT]), args.repeats)
    print(f"  one short prompt: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    many = short_prompts(20000)
    for name, texts in (("20000 short prompts", many), (f"{len(real)} llmrouter prompts", real)):
        rate = throughput(lambda t: static.encode(t, show_progress=False), texts)
        print(f"  {name:<24} {rate:10.0f} prompts/s")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
