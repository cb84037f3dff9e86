"""Requests- and tokens-per-minute limits: a sliding-window log.

Each admitted request is kept for :data:`RATE_WINDOW_S` with its token count (its token bound when
admitted: input tokens + the most output tokens it may produce; its actual usage once settled). A
request is admitted when, over the last 60 s, ``requests + 1 <= rpm`` and ``tokens + its bound <=
tpm``. The log is exact (no fixed-window bursts at a boundary, no approximation of a sliding-window
counter); it costs one entry per request in the last minute per key, which a per-minute limit
bounds. The SQLite store checks it in one transaction, the Redis store in one Lua script
(:mod:`~router_ml.serving.keys.redis_store`), so concurrent replicas never admit past the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RATE_WINDOW_S = 60.0


@dataclass(frozen=True)
class RateVerdict:
    """Whether a request is admitted; if not, which limit (``"rpm"``/``"tpm"``) refused it and in
    how many seconds it would fit (None: never, its bound alone is over the limit)."""

    ok: bool
    limit: str | None = None
    retry_after_s: float | None = None


def verdict_of(key: object, window: Sequence[tuple[float, int]], need: int, now: float) -> RateVerdict:
    """The verdict for a request of ``need`` tokens given the key's admitted ``(ts, tokens)`` of the
    last minute, oldest first."""
    rpm, tpm = getattr(key, "rpm", None), getattr(key, "tpm", None)
    if rpm is not None and len(window) + 1 > rpm:
        return RateVerdict(False, "rpm", max(0.0, window[len(window) - rpm][0] + RATE_WINDOW_S - now))
    if tpm is not None:
        used = sum(t for _, t in window)
        if used + need > tpm:
            if need > tpm:
                return RateVerdict(False, "tpm", None)
            freed = 0
            for ts, t in window:  # the oldest entries leave first
                freed += t
                if used - freed + need <= tpm:
                    return RateVerdict(False, "tpm", max(0.0, ts + RATE_WINDOW_S - now))
    return RateVerdict(True)
