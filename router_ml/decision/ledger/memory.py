"""The in-memory spend ledger: :class:`MemoryLedger`, the :class:`BudgetLedger` interface in bounded
memory (per-bucket aggregates, not one row per call), for a single proxy process, offline replays
and tests."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import pandas as pd

from router_ml.decision.ledger.records import RESERVATION_TTL_S, _check_record, _check_reservation

#: the columns of :meth:`MemoryLedger.entries`: one row per (bucket, session, model, backend)
AGGREGATE_COLUMNS = ["ts", "model", "cost_usd", "session", "count", "backend"]


class _Buckets:
    """Per-bucket totals sorted by bucket start, with prefix sums: a window's total is two
    bisections. A call in the newest bucket (the live case) updates it in O(1)."""

    def __init__(self) -> None:
        self.start: list[float] = []
        self.cum: list[float] = [0.0]  # prefix sums of cost over buckets
        self.ncum: list[int] = [0]  # prefix sums of counts

    def add(self, start: float, cost: float) -> None:
        if self.start and start == self.start[-1]:
            self.cum[-1] += cost
            self.ncum[-1] += 1
            return
        if not self.start or start > self.start[-1]:
            self.start.append(start)
            self.cum.append(self.cum[-1] + cost)
            self.ncum.append(self.ncum[-1] + 1)
            return
        i = bisect.bisect_left(self.start, start)  # an out-of-order record (a replay): rebuild from i
        costs = np.diff(self.cum).tolist()
        counts = np.diff(self.ncum).tolist()
        if i < len(self.start) and self.start[i] == start:
            costs[i] += cost
            counts[i] += 1
        else:
            self.start.insert(i, start)
            costs.insert(i, cost)
            counts.insert(i, 1)
        self.cum = [0.0, *np.cumsum(costs).tolist()]
        self.ncum = [0, *np.cumsum(counts).astype(int).tolist()]

    def window(self, since: float | None, until: float | None) -> tuple[int, int]:
        lo = 0 if since is None else bisect.bisect_left(self.start, since)
        hi = len(self.start) if until is None else bisect.bisect_left(self.start, until)
        return lo, max(lo, hi)


class MemoryLedger:
    """The :class:`BudgetLedger` interface in bounded memory (thread-safe).

    It keeps **aggregates, not rows**: per ``resolution_s`` bucket (default one hour, UTC-aligned)
    and per session, the count and the sum of the calls, and per (bucket, session, model, backend)
    the same for :meth:`entries`. Memory grows with the number of buckets x sessions x models, not with
    traffic. A record counts in a window when its bucket's start lies in ``[since, until)``: exact
    for bounds on bucket boundaries, which every budget period's start is (hour, day, week, month;
    ``period_start``); finer bounds are rounded down to their bucket. ``meta`` is not kept.
    Duplicate ``request_id``s are recognised among the last ``dedupe_ids`` ids recorded (retries
    arrive within seconds; older ids are forgotten to keep memory flat).

    Reservations (:meth:`reserve`, :meth:`release`; :meth:`record` settles) are held under the lock.
    """

    def __init__(self, resolution_s: float = 3600.0, dedupe_ids: int = 100_000) -> None:
        if not (math.isfinite(resolution_s) and resolution_s > 0):
            raise ValueError(f"MemoryLedger: resolution_s must be > 0, got {resolution_s!r}")
        if dedupe_ids < 1:
            raise ValueError(f"MemoryLedger: dedupe_ids must be >= 1, got {dedupe_ids!r}")
        self.resolution_s, self.dedupe_ids = float(resolution_s), int(dedupe_ids)
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._all = _Buckets()
        self._by_session: dict[str | None, _Buckets] = {}
        self._by_model: dict[tuple[float, str | None, str, str | None], list] = {}  # -> [count, cost]
        self._res: dict[str, tuple[float, float, str | None]] = {}  # id -> (amount, expires, session)

    def __repr__(self) -> str:
        return f"MemoryLedger(n={self._all.ncum[-1]}, buckets={len(self._all.start)})"

    def _bucket(self, ts: float) -> float:
        return math.floor(ts / self.resolution_s) * self.resolution_s

    def record(
        self,
        cost_usd: float,
        model: str,
        request_id: str | None = None,
        ts: float | None = None,
        session: str | None = None,
        meta: Mapping | None = None,
        backend: str | None = None,
    ) -> bool:
        """Record one call's spend (settling its reservation, if any); ``False`` (and nothing
        changes but the reservation's release) when ``request_id`` was recorded recently.
        ``model``: the model decided on; ``backend``: the catalog backend that served it."""
        rid, when, model, cost, session, _, backend = _check_record(
            cost_usd, model, request_id, ts, session, meta, backend
        )
        start = self._bucket(when)
        with self._lock:
            self._res.pop(rid, None)
            if rid in self._ids:
                return False
            self._ids[rid] = None
            if len(self._ids) > self.dedupe_ids:
                self._ids.popitem(last=False)
            self._all.add(start, cost)
            self._by_session.setdefault(session, _Buckets()).add(start, cost)
            agg = self._by_model.setdefault((start, session, model, backend), [0, 0.0])
            agg[0] += 1
            agg[1] += cost
        return True

    def _series(self, session: str | None) -> _Buckets:
        return self._all if session is None else self._by_session.get(session, _Buckets())

    def spent(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> float:
        """Total $ recorded with ``since <= bucket start < until`` (open ends when ``None``) in ``session``."""
        with self._lock:
            series = self._series(session)
            lo, hi = series.window(since, until)
            return float(series.cum[hi] - series.cum[lo])

    def count(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> int:
        """Number of records in the window (same filters as :meth:`spent`)."""
        with self._lock:
            series = self._series(session)
            lo, hi = series.window(since, until)
            return int(series.ncum[hi] - series.ncum[lo])

    def entries(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> pd.DataFrame:
        """Aggregates, not rows: one row per (bucket, session, model, backend) in the window, oldest
        first, columns ``ts`` (the bucket's start), ``model``, ``cost_usd`` (their sum), ``session``,
        ``count``, ``backend``."""
        with self._lock:
            rows = [
                (start, model, agg[1], sess, agg[0], backend)
                for (start, sess, model, backend), agg in self._by_model.items()
                if (since is None or start >= since)
                and (until is None or start < until)
                and (session is None or sess == session)
            ]
        rows.sort(key=lambda r: (r[0], "" if r[3] is None else r[3], r[1], r[5] or ""))
        cols = list(zip(*rows, strict=True)) if rows else [()] * len(AGGREGATE_COLUMNS)
        return pd.DataFrame(
            {
                "ts": np.asarray(cols[0], dtype="float64"),
                "model": pd.Series(cols[1], dtype="str"),
                "cost_usd": np.asarray(cols[2], dtype="float64"),
                "session": pd.Series(cols[3], dtype="object"),
                "count": np.asarray(cols[4], dtype="int64"),
                "backend": pd.Series(cols[5], dtype="object"),
            }
        )

    # ------------------------------------------------------------------ reservations
    def _outstanding(self, session: str | None, now: float) -> float:
        for rid in [r for r, (_, exp, _) in self._res.items() if exp <= now]:  # lapsed: forget
            del self._res[rid]
        return math.fsum(a for a, _, s in self._res.values() if session is None or s == session)

    def reserve(
        self,
        request_id: str,
        amount_usd: float,
        cap_usd: float,
        since: float | None = None,
        session: str | None = None,
        ttl_s: float = RESERVATION_TTL_S,
        now: float | None = None,
    ) -> bool:
        """Hold ``amount_usd`` for ``request_id`` if ``spent(since, session) + outstanding
        reservations + amount <= cap_usd``; ``False`` (nothing held) otherwise. The hold lapses
        after ``ttl_s``; :meth:`record` settles it, :meth:`release` drops it. Re-reserving an id
        replaces its hold."""
        rid, amount, cap, ttl = _check_reservation(request_id, amount_usd, cap_usd, ttl_s, session)
        now = time.time() if now is None else float(now)
        with self._lock:
            self._res.pop(rid, None)
            series = self._series(session)
            lo, hi = series.window(since, None)
            used = series.cum[hi] - series.cum[lo] + self._outstanding(session, now)
            if used + amount > cap * (1 + 1e-12):
                return False
            self._res[rid] = (amount, now + ttl, session)
        return True

    def release(self, request_id: str) -> bool:
        """Drop ``request_id``'s reservation (its call failed); ``False`` when it held none."""
        with self._lock:
            return self._res.pop(request_id, None) is not None

    def reserved(self, session: str | None = None, now: float | None = None) -> float:
        """$ held by reservations that have not lapsed (``session`` None: all)."""
        with self._lock:
            return self._outstanding(session, time.time() if now is None else float(now))

    def close(self) -> None:
        """Nothing to release (kept for the shared interface)."""

    def __enter__(self) -> MemoryLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
