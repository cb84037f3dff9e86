"""The in-memory spend ledger: :class:`MemoryLedger`, the :class:`BudgetLedger` interface with
running totals and per-session prefix sums, for offline replays and tests."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping

import pandas as pd

from router_ml.decision.ledger.records import _check_record, _entries_frame


class _Series:
    """Records sorted by ts with prefix sums of cost: window totals by two bisections."""

    def __init__(self) -> None:
        self.ts: list[float] = []
        self.cost: list[float] = []
        self.cum: list[float] = [0.0]

    def add(self, ts: float, cost: float) -> None:
        if not self.ts or ts >= self.ts[-1]:  # the usual case in a replay: O(1)
            self.ts.append(ts)
            self.cost.append(cost)
            self.cum.append(self.cum[-1] + cost)
            return
        i = bisect.bisect_right(self.ts, ts)
        self.ts.insert(i, ts)
        self.cost.insert(i, cost)
        del self.cum[i + 1 :]
        for c in self.cost[i:]:
            self.cum.append(self.cum[-1] + c)

    def window(self, since: float | None, until: float | None) -> tuple[int, int]:
        lo = 0 if since is None else bisect.bisect_left(self.ts, since)
        hi = len(self.ts) if until is None else bisect.bisect_left(self.ts, until)
        return lo, max(lo, hi)


class MemoryLedger:
    """The :class:`BudgetLedger` interface in memory (thread-safe), for offline replays and tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[tuple] = []
        self._ids: set[str] = set()
        self._all = _Series()
        self._by_session: dict[str | None, _Series] = {}

    def __repr__(self) -> str:
        return f"MemoryLedger(n={len(self._rows)})"

    def record(
        self,
        cost_usd: float,
        model: str,
        request_id: str | None = None,
        ts: float | None = None,
        session: str | None = None,
        meta: Mapping | None = None,
    ) -> bool:
        """Record one call's spend; ``False`` (and nothing changes) when ``request_id`` is already in."""
        row = _check_record(cost_usd, model, request_id, ts, session, meta)
        rid, when, _, cost, session, _ = row
        with self._lock:
            if rid in self._ids:
                return False
            self._ids.add(rid)
            self._rows.append(row)
            self._all.add(when, cost)
            self._by_session.setdefault(session, _Series()).add(when, cost)
        return True

    def _series(self, session: str | None) -> _Series:
        return self._all if session is None else self._by_session.get(session, _Series())

    def spent(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> float:
        """Total $ recorded with ``since <= ts < until`` (open ends when ``None``) in ``session``."""
        with self._lock:
            series = self._series(session)
            lo, hi = series.window(since, until)
            return float(series.cum[hi] - series.cum[lo])

    def count(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> int:
        """Number of records in the window (same filters as :meth:`spent`)."""
        with self._lock:
            lo, hi = self._series(session).window(since, until)
            return hi - lo

    def entries(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> pd.DataFrame:
        """The records in the window, oldest first (same columns as :meth:`BudgetLedger.entries`)."""
        with self._lock:
            rows = [
                r
                for r in self._rows
                if (since is None or r[1] >= since)
                and (until is None or r[1] < until)
                and (session is None or r[4] == session)
            ]
        rows.sort(key=lambda r: r[1])  # stable: ties keep insertion order, as BudgetLedger's rowid
        return _entries_frame(rows)

    def close(self) -> None:
        """Nothing to release (kept for the shared interface)."""

    def __enter__(self) -> MemoryLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
