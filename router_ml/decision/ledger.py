"""Spend ledgers: how much the router has spent, per time window and session, across restarts.

- :class:`BudgetLedger` keeps one row per request in SQLite: WAL journal, a busy timeout and one
  ``BEGIN IMMEDIATE`` transaction per write, so several threads and processes can record into the
  same file at once, a killed writer loses at most the record in flight, and the total is always
  the sum of the stored rows. ``request_id`` is the primary key: recording a retry twice counts once.
- :class:`MemoryLedger` has the same interface in memory, for offline replays (running totals and
  per-session prefix sums, so ``spent`` over a window costs O(log n)).
- :func:`period_start` turns a budget period ("hour", "day", ...) into the UTC start of the current
  window; :func:`open_ledger` builds either ledger from a config string.

Windows are half-open: ``since <= ts < until``; ``session=None`` means every session.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Schema version stored in ``PRAGMA user_version``; a newer file is refused, not guessed at.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` that marks a SQLite file as a router-ml spend ledger ("RMLG").
APPLICATION_ID = 0x524D4C47
PERIODS = ("session", "hour", "day", "week", "month")
COLUMNS = ["request_id", "ts", "model", "cost_usd", "session", "meta"]
_SCHEMA = [
    """CREATE TABLE spend (
        request_id TEXT PRIMARY KEY,
        ts REAL NOT NULL,
        model TEXT NOT NULL,
        cost_usd REAL NOT NULL CHECK (cost_usd >= 0),
        session TEXT,
        meta TEXT
    )""",
    "CREATE INDEX spend_ts ON spend (ts)",
    "CREATE INDEX spend_session_ts ON spend (session, ts)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
]


class LedgerError(ValueError):
    """A ledger file that cannot be used (not SQLite, not a ledger, newer schema) or a closed ledger."""


def _check_record(
    cost_usd: float,
    model: str,
    request_id: str | None,
    ts: float | None,
    session: str | None,
    meta: Mapping | None,
) -> tuple[str, float, str, float, str | None, str | None]:
    """Validate one record; returns the row ``(request_id, ts, model, cost, session, meta_json)``."""
    try:
        cost = float(cost_usd)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cost_usd must be a number, got {cost_usd!r}") from err
    if not math.isfinite(cost) or cost < 0:
        raise ValueError(f"cost_usd must be finite and >= 0, got {cost_usd!r}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string, got {model!r}")
    rid = uuid.uuid4().hex if request_id is None else str(request_id)
    when = time.time() if ts is None else float(ts)
    if not math.isfinite(when):
        raise ValueError(f"ts must be a finite unix time, got {ts!r}")
    try:
        meta_json = None if meta is None else json.dumps(dict(meta), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be a JSON-serialisable mapping: {err}") from err
    if session is not None and not isinstance(session, str):
        raise ValueError(f"session must be a string or None, got {session!r}")
    return rid, when, model, cost, session, meta_json


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _entries_frame(rows: list[tuple]) -> pd.DataFrame:
    """Rows ``(request_id, ts, model, cost, session, meta_json)`` -> the ``entries()`` frame."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(COLUMNS)
    return pd.DataFrame(
        {
            "request_id": pd.Series(cols[0], dtype="str"),
            "ts": np.asarray(cols[1], dtype="float64"),
            "model": pd.Series(cols[2], dtype="str"),
            "cost_usd": np.asarray(cols[3], dtype="float64"),
            "session": pd.Series(cols[4], dtype="object"),  # None = no session (kept as None)
            "meta": pd.Series([None if m is None else json.loads(m) for m in cols[5]], dtype="object"),
        }
    )


class BudgetLedger:
    """Append-only spend records in SQLite, safe across restarts and concurrent writers.

    One connection per thread, reopened in a forked child (connections never cross ``fork``).
    ``synchronous=NORMAL`` in WAL mode: a committed record survives a crash or ``kill -9`` of the
    process; a power loss may drop the last commits but never corrupts the file.

    Parameters
    ----------
    path : the ledger file; its parent folder and the schema are created when missing.
    timeout_s : how long a writer waits for another writer's lock before failing.
    """

    def __init__(self, path: str | os.PathLike, timeout_s: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[tuple[int, sqlite3.Connection]] = []
        self._closed = False
        if self.path.is_dir():
            raise LedgerError(f"ledger path {str(self.path)!r} is a directory, expected a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema(self._conn())

    def __reduce__(self) -> tuple[Any, ...]:  # pickles as its arguments: a spawned worker reopens the file
        return (type(self), (str(self.path), self.timeout_s))

    def __repr__(self) -> str:
        return f"BudgetLedger({str(self.path)!r})"

    # ------------------------------------------------------------------ connections
    def _fail(self, err: Exception) -> LedgerError:
        return LedgerError(f"spend ledger {str(self.path)!r} cannot be used: {err}")

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise LedgerError(f"spend ledger {str(self.path)!r} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # isolation_level=None: no implicit transactions; each write is BEGIN IMMEDIATE..COMMIT.
        # check_same_thread=False only so close() can close every thread's connection.
        conn = sqlite3.connect(
            self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            # switching a new file to WAL can fail "locked" at once while another process does it
            self._retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as err:
            conn.close()
            raise self._fail(err) from err
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._conns.append((os.getpid(), conn))
        return conn

    def _retry_locked(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn``, retrying for up to ``timeout_s`` while SQLite answers "locked"/"busy" at once
        (it skips the busy handler where waiting could deadlock, e.g. during a journal-mode switch)."""
        deadline, delay = time.monotonic() + self.timeout_s, 0.002
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as err:
                text = str(err).lower()
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, 0.1)

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new file, or check that an existing file is a ledger we can read."""

        def create_or_read() -> tuple[int, int]:
            conn.execute("BEGIN IMMEDIATE")  # concurrent creators: one writes the schema, others see it
            try:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if app_id == 0 and version == 0 and tables == 0:
                    for stmt in _SCHEMA:
                        conn.execute(stmt)
                    app_id, version = APPLICATION_ID, SCHEMA_VERSION
            except BaseException:
                _rollback(conn)
                raise
            conn.execute("COMMIT")
            return app_id, version

        try:
            app_id, version = self._retry_locked(create_or_read)
        except sqlite3.DatabaseError as err:
            self.close()
            raise self._fail(err) from err
        problem = None
        if app_id != APPLICATION_ID:
            problem = f"it is a SQLite file but not a spend ledger (application_id {app_id})"
        elif version > SCHEMA_VERSION:
            problem = f"schema version {version} is newer than this code's {SCHEMA_VERSION}"
        if problem:
            self.close()
            raise LedgerError(f"spend ledger {str(self.path)!r} cannot be used: {problem}")

    def close(self) -> None:
        """Close every connection this process opened; the ledger cannot be used afterwards."""
        with self._lock:
            conns, self._conns = self._conns, []
        for pid, conn in conns:
            if pid == os.getpid():
                conn.close()
        self._local = threading.local()
        self._closed = True

    def __enter__(self) -> BudgetLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writes and reads
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
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                "INSERT OR IGNORE INTO spend (request_id, ts, model, cost_usd, session, meta)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")
        return cur.rowcount == 1

    @staticmethod
    def _where(since: float | None, until: float | None, session: str | None) -> tuple[str, list]:
        clauses, args = [], []
        for clause, value in (("ts >= ?", since), ("ts < ?", until), ("session = ?", session)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def spent(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> float:
        """Total $ recorded with ``since <= ts < until`` (open ends when ``None``) in ``session``."""
        where, args = self._where(since, until, session)
        row = self._conn().execute(f"SELECT COALESCE(SUM(cost_usd), 0.0) FROM spend{where}", args)
        return float(row.fetchone()[0])

    def count(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> int:
        """Number of records in the window (same filters as :meth:`spent`)."""
        where, args = self._where(since, until, session)
        return int(self._conn().execute(f"SELECT COUNT(*) FROM spend{where}", args).fetchone()[0])

    def entries(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> pd.DataFrame:
        """The records in the window, oldest first: columns ``request_id, ts, model, cost_usd, session,
        meta`` (``meta`` as a dict or ``None``)."""
        where, args = self._where(since, until, session)
        sql = f"SELECT {', '.join(COLUMNS)} FROM spend{where} ORDER BY ts, rowid"
        return _entries_frame(self._conn().execute(sql, args).fetchall())


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


def period_start(period: str | None, now: float | None = None) -> float | None:
    """UTC unix time at which the current budget ``period`` began (``None``: no time window).

    ``"session"``/``None`` -> ``None``; ``"hour"``, ``"day"``, ``"week"`` (Monday 00:00) and
    ``"month"`` (the 1st, 00:00) -> the start of the period that contains ``now`` (default: now).
    """
    if period is None or period == "session":
        return None
    if period not in PERIODS:
        raise ValueError(f"unknown budget period {period!r}; allowed: {list(PERIODS)} or None")
    t = datetime.fromtimestamp(time.time() if now is None else float(now), tz=timezone.utc)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "week":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=t.weekday())
    else:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp()


def open_ledger(spec: str | os.PathLike | None) -> Any:
    """A ledger from a config value: ``None``/``"memory"`` -> :class:`MemoryLedger`;
    ``"redis://..."`` -> a Redis ledger shared by proxy replicas; ``"sqlite:<path>"`` or a plain
    path -> :class:`BudgetLedger` on that file."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "memory")):
        return MemoryLedger()
    text = os.fspath(spec)
    if text.startswith(("redis://", "rediss://", "unix://")):
        from router_ml.serving.redis_ledger import RedisLedger

        return RedisLedger(text)
    if text.startswith("sqlite:"):
        text = text[len("sqlite:") :]
        if not text:
            raise ValueError("ledger spec 'sqlite:' needs a path, e.g. 'sqlite:runs/spend.sqlite'")
    return BudgetLedger(text)
