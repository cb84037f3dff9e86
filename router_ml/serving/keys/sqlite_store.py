"""The key store of a single proxy: one SQLite file (WAL, ``BEGIN IMMEDIATE`` writes), surviving
restarts, shared by every process that opens it (the proxy and ``router-ml keys``).

The file is a spend ledger (:class:`~router_ml.decision.ledger.BudgetLedger`) whose sessions are
``key:<id>`` and ``team:<name>``, so a key's and a team's budget are reserved, settled and released
by the ledger's own reservations; it also holds the keys, the teams and the rate windows::

    api_keys     id, name (unique), secret_hash (unique), the limits, team, created, revoked
    teams        name, budget_usd, period
    rate_events  key_id, request_id, ts, tokens: the requests admitted in the last minute
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from router_ml.decision.ledger import BudgetLedger
from router_ml.serving.keys.records import ApiKey, Team, check_name, hash_secret, new_key_id, new_secret
from router_ml.serving.keys.window import RATE_WINDOW_S, RateVerdict, verdict_of

_TABLES = [
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        secret_hash TEXT NOT NULL UNIQUE,
        record TEXT NOT NULL,
        revoked REAL
    )""",
    "CREATE TABLE IF NOT EXISTS teams (name TEXT PRIMARY KEY, record TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS rate_events (
        key_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        ts REAL NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (key_id, request_id)
    )""",
    "CREATE INDEX IF NOT EXISTS rate_events_ts ON rate_events (key_id, ts)",
]


class SqliteKeyStore:
    """Keys, teams, their spend (a :class:`BudgetLedger` in the same file) and rate windows.

    Parameters
    ----------
    path : the store's file (created with its folder when missing). Not the proxy's ``--ledger``
        file: key spend there would count twice in the proxy's own cap.
    """

    def __init__(self, path: str | Path, timeout_s: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self.ledger = BudgetLedger(self.path, timeout_s=timeout_s)  # validates and creates the file
        self._conn = self.ledger._conn  # one connection per thread, as the ledger's
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _TABLES:
                conn.execute(stmt)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def __repr__(self) -> str:
        return f"SqliteKeyStore({str(self.path)!r})"

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> SqliteKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, args: tuple) -> sqlite3.Cursor:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(sql, args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return cur

    # ------------------------------------------------------------------ keys and teams
    def create_key(self, name: str, **limits: Any) -> tuple[ApiKey, str]:
        """A new key ``name`` with ``limits`` (:class:`ApiKey` fields); ``(key, secret)``. The
        secret is returned only here."""
        secret = new_secret()
        key = ApiKey(new_key_id(), name, hash_secret(secret), created=time.time(), **limits)
        try:
            self._write(
                "INSERT INTO api_keys (id, name, secret_hash, record, revoked) VALUES (?, ?, ?, ?, NULL)",
                (key.id, key.name, key.secret_hash, json.dumps(key.to_record())),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a key named {name!r} already exists in {str(self.path)!r}") from None
        return key, secret

    @staticmethod
    def _key(row: Any) -> ApiKey | None:
        if row is None:
            return None
        rec = json.loads(row[0])
        rec["revoked"] = row[1]
        return ApiKey.from_record(rec)

    def key_by_secret(self, secret: str) -> ApiKey | None:
        """The key whose secret is ``secret`` (revoked ones included), else None."""
        row = (
            self._conn()
            .execute("SELECT record, revoked FROM api_keys WHERE secret_hash = ?", (hash_secret(secret),))
            .fetchone()
        )
        return self._key(row)

    def get_key(self, name_or_id: str) -> ApiKey:
        row = (
            self._conn()
            .execute(
                "SELECT record, revoked FROM api_keys WHERE name = ? OR id = ?", (name_or_id, name_or_id)
            )
            .fetchone()
        )
        if row is None:
            raise ValueError(f"no key named {name_or_id!r} in {str(self.path)!r}")
        return self._key(row)  # type: ignore[return-value]

    def list_keys(self) -> list[ApiKey]:
        rows = self._conn().execute("SELECT record, revoked FROM api_keys ORDER BY rowid").fetchall()
        return [self._key(r) for r in rows]  # type: ignore[misc]

    def revoke(self, name_or_id: str) -> ApiKey:
        """Revoke a key (for good: its requests get 401 from then on); the revoked key."""
        key = self.get_key(name_or_id)
        if key.active:
            self._write(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key.id)
            )
        return self.get_key(key.id)

    def set_team(self, team: Team) -> Team:
        self._write(
            "INSERT INTO teams (name, record) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET record = excluded.record",
            (team.name, json.dumps(team.to_dict())),
        )
        return team

    def team(self, name: str) -> Team | None:
        check_name(name, "team")
        row = self._conn().execute("SELECT record FROM teams WHERE name = ?", (name,)).fetchone()
        return None if row is None else Team(**json.loads(row[0]))

    def list_teams(self) -> list[Team]:
        rows = self._conn().execute("SELECT record FROM teams ORDER BY name").fetchall()
        return [Team(**json.loads(r[0])) for r in rows]

    # ------------------------------------------------------------------ rate windows
    def admit_rate(self, key: ApiKey, request_id: str, tokens: int, now: float | None = None) -> RateVerdict:
        """Admit one request of ``tokens`` (its token bound) if the key's last minute leaves room
        for it under ``rpm`` and ``tpm``; check and admission are one transaction."""
        now = time.time() if now is None else float(now)
        if key.rpm is None and key.tpm is None:
            return RateVerdict(True)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "DELETE FROM rate_events WHERE key_id = ? AND (ts <= ? OR request_id = ?)",
                (key.id, now - RATE_WINDOW_S, request_id),
            )
            n, used = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM rate_events WHERE key_id = ?", (key.id,)
            ).fetchone()
            verdict = RateVerdict(True)
            if (key.rpm is not None and n + 1 > key.rpm) or (key.tpm is not None and used + tokens > key.tpm):
                window = conn.execute(  # refused: when would it fit?
                    "SELECT ts, tokens FROM rate_events WHERE key_id = ? ORDER BY ts", (key.id,)
                ).fetchall()
                verdict = verdict_of(key, window, int(tokens), now)
            if verdict.ok:
                conn.execute(
                    "INSERT INTO rate_events (key_id, request_id, ts, tokens) VALUES (?, ?, ?, ?)",
                    (key.id, request_id, now, int(tokens)),
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return verdict

    def settle_rate(self, key: ApiKey, request_id: str, tokens: int) -> None:
        """The request's actual tokens replace its bound in the window."""
        if key.rpm is not None or key.tpm is not None:
            self._write(
                "UPDATE rate_events SET tokens = ? WHERE key_id = ? AND request_id = ?",
                (int(tokens), key.id, request_id),
            )

    def release_rate(self, key: ApiKey, request_id: str) -> None:
        """A request that reached no backend leaves the window."""
        if key.rpm is not None or key.tpm is not None:
            self._write("DELETE FROM rate_events WHERE key_id = ? AND request_id = ?", (key.id, request_id))

    def rate_usage(self, key: ApiKey, now: float | None = None) -> tuple[int, int]:
        """``(requests, tokens)`` of the key in the last minute."""
        now = time.time() if now is None else float(now)
        n, t = (
            self._conn()
            .execute(
                "SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM rate_events WHERE key_id = ? AND ts > ?",
                (key.id, now - RATE_WINDOW_S),
            )
            .fetchone()
        )
        return int(n), int(t)
