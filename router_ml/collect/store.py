"""The collection store: every call of a collection, append-only, in one SQLite file.

Why SQLite (WAL mode) and not parquet / JSONL segments: each finished call is one committed
``INSERT`` (a WAL append, microseconds), so a ``kill -9`` at any instant loses no answer that was
stored and never leaves a torn row behind; a partial unique index, ``UNIQUE (prompt_id, model)
WHERE ok = 1``, makes a second answer for a pair impossible even when two collectors share the
file; a rerun reads the answered pairs with one query. ``synchronous = NORMAL`` (the default)
survives a crash or ``kill -9`` of the process; ``FULL`` also survives a power loss (an fsync per
call). Parquet segments would need their own footer-or-nothing flushing and a dedup pass on read.

Tables (``pandas`` reads them: :meth:`AnswerStore.answers`, :meth:`AnswerStore.calls`,
:func:`read_store`):

- ``prompts``: ``prompt_id`` (primary key), ``prompt``, ``task``, ``reference``, ``tests`` (JSON),
  ``source``, ``added_at``;
- ``calls``: one row per finished call, answers and errors alike (``ok`` 1 / 0): ``answer``,
  ``finish_reason``, ``input_tokens`` / ``output_tokens`` and ``usage_source`` (``upstream`` or
  ``counted`` with the backend's tokenizer), ``cost_usd`` (catalog prices), ``reserved_usd`` (the
  spend cap's bound for it), ``ttft_s``, ``latency_s``, ``attempts``, ``error_kind``,
  ``error_message``, ``http_status``, the request's ``max_tokens`` / ``temperature``, ``run_id``,
  ``started_at`` / ``finished_at`` (Unix s). Errors are kept as history; a pair without an
  ``ok`` row is called again by the next run;
- ``runs``: one row per collection run (its config, cap, spend, why it stopped);
- ``scores``: left to the scorers, keyed by ``(prompt_id, model, scorer, version)``: ``score``
  (in [0, 1]), ``detail`` (JSON), ``cost_usd`` (a judge's own bill), ``error``, ``scored_at``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from router_ml.collect.prompts import Prompt
from router_ml.data.store_file import (
    ANSWERS_SQL,
    APPLICATION_ID,
    SCHEMA_VERSION,
    SCORES_SQL,
    StoreFileError,
    check_store,
)
from router_ml.sqlite_retry import retry_locked

SYNCHRONOUS = ("NORMAL", "FULL")
_SCHEMA = [
    """CREATE TABLE prompts (
        prompt_id TEXT PRIMARY KEY,
        prompt TEXT NOT NULL,
        task TEXT,
        reference TEXT,
        tests TEXT,
        source TEXT,
        added_at REAL NOT NULL
    )""",
    """CREATE TABLE calls (
        call_id INTEGER PRIMARY KEY AUTOINCREMENT,
        prompt_id TEXT NOT NULL REFERENCES prompts (prompt_id),
        model TEXT NOT NULL,
        ok INTEGER NOT NULL CHECK (ok IN (0, 1)),
        answer TEXT,
        finish_reason TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        usage_source TEXT,
        cost_usd REAL,
        reserved_usd REAL,
        ttft_s REAL,
        latency_s REAL,
        attempts INTEGER,
        error_kind TEXT,
        error_message TEXT,
        http_status INTEGER,
        max_tokens INTEGER,
        temperature REAL,
        run_id TEXT,
        started_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        CHECK (ok = 0 OR answer IS NOT NULL)
    )""",
    "CREATE UNIQUE INDEX calls_one_answer ON calls (prompt_id, model) WHERE ok = 1",
    "CREATE INDEX calls_pair ON calls (prompt_id, model)",
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        finished_at REAL,
        config TEXT,
        spend_cap_usd REAL,
        spent_usd REAL,
        stop_reason TEXT
    )""",
    """CREATE TABLE scores (
        prompt_id TEXT NOT NULL,
        model TEXT NOT NULL,
        scorer TEXT NOT NULL,
        version TEXT NOT NULL,
        score REAL,
        detail TEXT,
        cost_usd REAL,
        error TEXT,
        scored_at REAL NOT NULL,
        PRIMARY KEY (prompt_id, model, scorer, version)
    )""",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
]
CALL_COLUMNS = (
    "prompt_id",
    "model",
    "ok",
    "answer",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "usage_source",
    "cost_usd",
    "reserved_usd",
    "ttft_s",
    "latency_s",
    "attempts",
    "error_kind",
    "error_message",
    "http_status",
    "max_tokens",
    "temperature",
    "run_id",
    "started_at",
    "finished_at",
)
_INSERT_CALL = f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) VALUES ({', '.join('?' * len(CALL_COLUMNS))})"


SCORE_COLUMNS = (
    "prompt_id",
    "model",
    "scorer",
    "version",
    "score",
    "detail",
    "cost_usd",
    "error",
    "scored_at",
)


class StoreError(StoreFileError):
    """A collection store that cannot be used, or a prompt that clashes with a stored one."""


@dataclass
class CallRecord:
    """One finished call (an answer when ``ok``, else an error); see the module docstring."""

    prompt_id: str
    model: str
    ok: bool
    started_at: float
    finished_at: float
    answer: str | None = None
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    usage_source: str | None = None
    cost_usd: float | None = None
    reserved_usd: float | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    attempts: int | None = None
    error_kind: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    run_id: str | None = None

    def row(self) -> tuple[Any, ...]:
        values = asdict(self)
        values["ok"] = int(self.ok)
        return tuple(values[c] for c in CALL_COLUMNS)


class AnswerStore:
    """The collection store at ``path`` (created with its folder when missing).

    One connection, used from one thread (the collector's event loop); every write is its own
    transaction, committed before the method returns. ``synchronous``: ``"NORMAL"`` (a committed
    call survives a crash or ``kill -9``) or ``"FULL"`` (and a power loss; an fsync per call).
    """

    def __init__(self, path: str | os.PathLike, synchronous: str = "NORMAL", timeout_s: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        if str(synchronous).upper() not in SYNCHRONOUS:
            raise StoreError(f"store: synchronous = {synchronous!r} must be one of {list(SYNCHRONOUS)}")
        if self.path.is_dir():
            raise StoreError(f"store {str(self.path)!r} is a directory, expected a SQLite file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = float(timeout_s)
        try:
            # isolation_level=None: no implicit transactions; a lone INSERT commits by itself
            self._db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            retry_locked(lambda: self._db.execute("PRAGMA journal_mode = WAL").fetchone(), self.timeout_s)
            self._db.execute(f"PRAGMA synchronous = {str(synchronous).upper()}")
            self._init_schema()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"store {str(self.path)!r} cannot be used: {err}") from None

    def __repr__(self) -> str:
        return f"AnswerStore({str(self.path)!r})"

    def __enter__(self) -> AnswerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _init_schema(self) -> None:
        def create_or_read() -> None:
            self._db.execute("BEGIN IMMEDIATE")  # concurrent creators: one writes the schema
            try:
                app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if app_id == 0 and version == 0 and tables == 0:
                    for stmt in _SCHEMA:
                        self._db.execute(stmt)
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

        retry_locked(create_or_read, self.timeout_s)
        try:
            check_store(self._db, self.path)
        except StoreFileError as err:
            raise StoreError(str(err)) from None

    # ------------------------------------------------------------------------------ writes
    def add_prompts(self, prompts: Sequence[Prompt]) -> int:
        """Store the prompts not yet in (one transaction); how many were new. A stored id with a
        different text is a :class:`StoreError`: answers must never be matched to the wrong prompt."""
        now = time.time()
        stored = dict(self._db.execute("SELECT prompt_id, prompt FROM prompts").fetchall())
        new = []
        for p in prompts:
            old = stored.get(p.prompt_id)
            if old is None:
                new.append((p.prompt_id, p.prompt, p.task, p.reference, p.tests_json(), p.source, now))
                stored[p.prompt_id] = p.prompt
            elif old != p.prompt:
                raise StoreError(
                    f"store {str(self.path)!r}: prompt id {p.prompt_id!r} (from {p.source}) is stored "
                    f"with a different text; give the prompt another id or use another store"
                )
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT INTO prompts VALUES (?, ?, ?, ?, ?, ?, ?)", new)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return len(new)

    def record(self, call: CallRecord) -> bool:
        """Append one finished call, committed on return. ``False`` (nothing written) when ``call``
        is an answer for a pair that already has one (another collector was faster)."""
        try:
            self._db.execute(_INSERT_CALL, call.row())
        except sqlite3.IntegrityError as err:
            if call.ok and "UNIQUE" in str(err):
                return False
            raise StoreError(
                f"store {str(self.path)!r}: cannot record {call.prompt_id!r} x {call.model!r}: {err}"
            ) from None
        return True

    def start_run(self, config: Mapping[str, Any], spend_cap_usd: float | None) -> str:
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._db.execute(
            "INSERT INTO runs (run_id, started_at, config, spend_cap_usd) VALUES (?, ?, ?, ?)",
            (run_id, time.time(), json.dumps(config, default=str), spend_cap_usd),
        )
        return run_id

    def finish_run(self, run_id: str, spent_usd: float, stop_reason: str) -> None:
        self._db.execute(
            "UPDATE runs SET finished_at = ?, spent_usd = ?, stop_reason = ? WHERE run_id = ?",
            (time.time(), spent_usd, stop_reason, run_id),
        )

    def add_scores(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Write verdicts into ``scores`` (one transaction; keys :data:`SCORE_COLUMNS`, ``scored_at``
        defaults to now). A row for a stored (prompt_id, model, scorer, version) replaces it: callers
        re-score only failed verdicts (:meth:`scored_keys`). Returns how many were written."""
        now = time.time()
        values = [
            tuple((r.get(c) or now) if c == "scored_at" else r.get(c) for c in SCORE_COLUMNS) for r in rows
        ]
        marks = ", ".join("?" * len(SCORE_COLUMNS))

        def write() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(f"INSERT OR REPLACE INTO scores VALUES ({marks})", values)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

        retry_locked(write, self.timeout_s)
        return len(values)

    # ------------------------------------------------------------------------------- reads
    def answered(self, models: Iterable[str] | None = None) -> set[tuple[str, str]]:
        """The (prompt_id, model) pairs that have an answer (of ``models``, or all)."""
        rows = self._db.execute("SELECT prompt_id, model FROM calls WHERE ok = 1").fetchall()
        keep = None if models is None else set(models)
        return {(p, m) for p, m in rows if keep is None or m in keep}

    def _frame(self, sql: str) -> pd.DataFrame:
        return pd.read_sql_query(sql, self._db)

    def prompts(self) -> pd.DataFrame:
        return self._frame("SELECT * FROM prompts ORDER BY rowid")

    def calls(self) -> pd.DataFrame:
        """Every call, errors included, in the order they finished."""
        return self._frame("SELECT * FROM calls ORDER BY call_id")

    def runs(self) -> pd.DataFrame:
        return self._frame("SELECT * FROM runs ORDER BY started_at")

    def answers(self) -> pd.DataFrame:
        """One row per (prompt, model) called: its answer, or its latest error while it has none;
        the prompt's text, task, reference and tests alongside (:data:`~router_ml.data.store_file.ANSWERS_SQL`)."""
        return self._frame(ANSWERS_SQL)

    def scores(self) -> pd.DataFrame:
        """Every stored verdict (:data:`~router_ml.data.store_file.SCORES_SQL`)."""
        return self._frame(SCORES_SQL)

    def scored_keys(self) -> set[tuple[str, str, str, str]]:
        """(prompt_id, model, scorer, version) of the verdicts stored with a score and no error."""
        rows = self._db.execute(
            "SELECT prompt_id, model, scorer, version FROM scores WHERE error IS NULL AND score IS NOT NULL"
        )
        return {tuple(r) for r in rows.fetchall()}


def read_store(path: str | os.PathLike) -> pd.DataFrame:
    """:meth:`AnswerStore.answers` of the store at ``path`` (a clear error when it is missing)."""
    if not Path(path).is_file():
        raise StoreError(f"store {str(path)!r} not found")
    with AnswerStore(path) as store:
        return store.answers()
