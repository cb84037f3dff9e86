"""Queue-aware first-token time of a local server from its live load (vLLM's metrics).

A continuous-batching server (vLLM) runs up to a batch of requests at once and queues the rest. A
request sent now waits for its turn, then for its prefill::

    ttft = prefill + queue wait + KV wait
    service   = inference / running          one request finishes every `service` s at full batch
    queue     = (waiting + 1) x service      when requests wait: ours needs waiting + 1 slots freed
    KV wait   = max(0, 1 - free / request) x service
                                             nobody waits, but the free KV cache holds less than an
                                             average request: ours waits for a running one to finish

Every coefficient is a measurement of the server itself, none is set by hand: ``inference`` is
the mean time its requests ran (prefill + decode: vLLM's ``request_inference_time_seconds``),
``prefill`` its mean prefill time, ``running`` / ``waiting`` its gauges, ``free`` the tokens its KV
cache has left (``(1 - kv_cache_usage_perc) x`` the cache's size) and ``request`` the mean prompt +
generated tokens of its requests. :class:`QueueLoad` holds one scrape's figures and the estimate;
:class:`~router_ml.decision.latency.LatencyModel` lets a fresh one raise the static estimate of the
models that server serves (never lower it), so every latency-aware policy sees the queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _ok(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x >= 0


@dataclass(frozen=True)
class QueueLoad:
    """One server's load at one scrape and the first-token time it implies (seconds).

    ``source``: the backend's name; ``at``: ``time.monotonic()`` of the scrape (how fresh it is);
    ``kv_usage``: 0-1 or None (not exported); ``service_s``: seconds between request completions
    at the current batch; ``prefill_s``, ``queue_s``, ``kv_s``: the parts of ``ttft_s``.
    """

    source: str
    at: float
    waiting: float
    running: float
    kv_usage: float | None
    service_s: float
    prefill_s: float
    queue_s: float
    kv_s: float

    @property
    def ttft_s(self) -> float:
        return self.prefill_s + self.queue_s + self.kv_s

    @property
    def loaded(self) -> bool:
        """Requests wait in its queue or for room in its KV cache."""
        return self.queue_s > 0 or self.kv_s > 0

    def describe(self) -> str:
        """``"vllm-a: 12 waiting, 2 running, KV 91% -> TTFT est 4.2 s"``."""
        kv = f", KV {self.kv_usage:.0%}" if self.kv_usage is not None else ""
        return (
            f"{self.source}: {self.waiting:g} waiting, {self.running:g} running{kv} "
            f"-> TTFT est {self.ttft_s:.1f} s"
        )


def queue_load(
    source: str,
    at: float,
    waiting: float | None,
    running: float | None,
    inference_s: float | None,
    prefill_s: float | None,
    kv_usage: float | None = None,
    kv_free_tokens: float | None = None,
    request_tokens: float | None = None,
) -> QueueLoad | None:
    """The :class:`QueueLoad` of one scrape (see the module docstring), or None when the figures
    it needs are missing (no queue gauges, or no request has finished yet to time the service):
    the caller keeps the static estimate then."""
    if not (_ok(waiting) and _ok(running) and _ok(inference_s) and inference_s > 0):
        return None
    prefill = prefill_s if _ok(prefill_s) else 0.0
    service = inference_s / max(running, 1.0)
    queue = (waiting + 1.0) * service if waiting > 0 else 0.0
    kv = 0.0
    if waiting == 0 and _ok(kv_free_tokens) and _ok(request_tokens) and request_tokens > 0:
        kv = max(0.0, 1.0 - kv_free_tokens / request_tokens) * service
    usage = kv_usage if _ok(kv_usage) else None
    return QueueLoad(source, at, float(waiting), float(running), usage, service, prefill, queue, kv)
