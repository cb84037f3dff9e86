"""The persistent spend ledger: :class:`BudgetLedger`, one row per request in SQLite (WAL, a busy
timeout, one ``BEGIN IMMEDIATE`` transaction per write), safe across restarts and concurrent
writers, with the reservations of calls in flight in the same file."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from router_ml.decision.ledger.records import (
    COLUMNS,
    RESERVATION_TTL_S,
    LedgerError,
    _check_record,
    _check_reservation,
    _entries_frame,
)
from router_ml.sqlite_retry import retry_locked

#: Schema version stored in ``PRAGMA user_version``; a newer file is refused, not guessed at.
SCHEMA_VERSION = 3
#: ``PRAGMA application_id`` that marks a SQLite file as a router-ml spend ledger ("RMLG").
APPLICATION_ID = 0x524D4C47
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
]
# version 2: the reservations of calls in flight, and hour totals (kept by a trigger) that a
# reservation sums over a budget period instead of every spend row of it; a version-1 file gains
# both (totals backfilled) when opened
_HOUR = "(CAST(NEW.ts / 3600 AS INTEGER) - (NEW.ts < 0 AND NEW.ts % 3600 != 0)) * 3600"
_RESERVATIONS = [
    """CREATE TABLE IF NOT EXISTS reservations (
        request_id TEXT PRIMARY KEY,
        amount_usd REAL NOT NULL CHECK (amount_usd >= 0),
        expires REAL NOT NULL,
        session TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS reservations_expires ON reservations (expires)",
    """CREATE TABLE IF NOT EXISTS spend_hours (
        hour INTEGER NOT NULL,
        skey TEXT NOT NULL,  -- 's:<session>', or '-' for none
        cost_usd REAL NOT NULL,
        PRIMARY KEY (hour, skey)
    )""",
    f"""CREATE TRIGGER IF NOT EXISTS spend_hours_add AFTER INSERT ON spend BEGIN
        INSERT INTO spend_hours (hour, skey, cost_usd)
        VALUES ({_HOUR}, COALESCE('s:' || NEW.session, '-'), NEW.cost_usd)
        ON CONFLICT (hour, skey) DO UPDATE SET cost_usd = cost_usd + excluded.cost_usd;
    END""",
    f"""INSERT INTO spend_hours (hour, skey, cost_usd)
        SELECT {_HOUR.replace("NEW.", "")} AS h, COALESCE('s:' || session, '-') AS k, SUM(cost_usd)
        FROM spend WHERE NOT EXISTS (SELECT 1 FROM spend_hours) GROUP BY h, k""",
    "PRAGMA user_version = 2",
]
# version 3: the backend that served each call, next to the model the router decided on (rows of
# older files read None there); a version-1 or -2 file gains the column when opened
_BACKEND = ["ALTER TABLE spend ADD COLUMN backend TEXT", f"PRAGMA user_version = {SCHEMA_VERSION}"]


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


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
        return retry_locked(fn, self.timeout_s)

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new file, or check that an existing file is a ledger we can read."""

        def create_or_read() -> tuple[int, int]:
            conn.execute("BEGIN IMMEDIATE")  # concurrent creators: one writes the schema, others see it
            try:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if app_id == 0 and version == 0 and tables == 0:
                    for stmt in _SCHEMA + _RESERVATIONS + _BACKEND:
                        conn.execute(stmt)
                    app_id, version = APPLICATION_ID, SCHEMA_VERSION
                elif app_id == APPLICATION_ID and version in (1, 2):  # upgrade in place
                    for stmt in (_RESERVATIONS if version == 1 else []) + _BACKEND:
                        conn.execute(stmt)
                    version = SCHEMA_VERSION
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
        backend: str | None = None,
    ) -> bool:
        """Record one call's spend and settle its reservation (both in one transaction); ``False``
        (and nothing changes but the reservation's release) when ``request_id`` is already in.
        ``model``: the model decided on; ``backend``: the catalog backend that served it."""
        row = _check_record(cost_usd, model, request_id, ts, session, meta, backend)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                "INSERT OR IGNORE INTO spend (request_id, ts, model, cost_usd, session, meta, backend)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            inserted = cur.rowcount == 1
            conn.execute("DELETE FROM reservations WHERE request_id = ?", (row[0],))
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")
        return inserted

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
        meta, backend`` (``meta`` as a dict or ``None``; ``backend`` None in rows of older files)."""
        where, args = self._where(since, until, session)
        sql = f"SELECT {', '.join(COLUMNS)} FROM spend{where} ORDER BY ts, rowid"
        return _entries_frame(self._conn().execute(sql, args).fetchall())

    # ------------------------------------------------------------------ reservations
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
        reservations + amount <= cap_usd``; ``False`` (nothing held) otherwise. Check and hold are
        one ``BEGIN IMMEDIATE`` transaction, so concurrent writers (threads, processes) never hold
        more than the cap together. The hold lapses after ``ttl_s`` (a crashed process's holds stop
        counting); :meth:`record` settles it, :meth:`release` drops it."""
        rid, amount, cap, ttl = _check_reservation(request_id, amount_usd, cap_usd, ttl_s, session)
        now = time.time() if now is None else float(now)
        if since is not None and float(since) % 3600 == 0:  # a period's start: sum its hour totals
            sql = "SELECT COALESCE(SUM(cost_usd), 0.0) FROM spend_hours WHERE hour >= ?"
            args: list = [int(since)]
            if session is not None:
                sql += " AND skey = ?"
                args.append(f"s:{session}")
        else:
            where, args = self._where(since, None, session)
            sql = f"SELECT COALESCE(SUM(cost_usd), 0.0) FROM spend{where}"
        res_where = " AND session = ?" if session is not None else ""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM reservations WHERE expires <= ? OR request_id = ?", (now, rid))
            spent = conn.execute(sql, args).fetchone()[0]
            held = conn.execute(
                f"SELECT COALESCE(SUM(amount_usd), 0.0) FROM reservations WHERE 1{res_where}",
                [] if session is None else [session],
            ).fetchone()[0]
            ok = spent + held + amount <= cap * (1 + 1e-12)
            if ok:
                conn.execute(
                    "INSERT INTO reservations (request_id, amount_usd, expires, session) VALUES (?, ?, ?, ?)",
                    (rid, amount, now + ttl, session),
                )
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")
        return bool(ok)

    def release(self, request_id: str) -> bool:
        """Drop ``request_id``'s reservation (its call failed); ``False`` when it held none."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute("DELETE FROM reservations WHERE request_id = ?", (str(request_id),))
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")
        return cur.rowcount == 1

    def reserved(self, session: str | None = None, now: float | None = None) -> float:
        """$ held by reservations that have not lapsed (``session`` None: all)."""
        now = time.time() if now is None else float(now)
        sql = "SELECT COALESCE(SUM(amount_usd), 0.0) FROM reservations WHERE expires > ?"
        args: list = [now]
        if session is not None:
            sql += " AND session = ?"
            args.append(session)
        return float(self._conn().execute(sql, args).fetchone()[0])
