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

import os
from typing import Any

from router_ml.decision.ledger.memory import MemoryLedger
from router_ml.decision.ledger.periods import PERIODS, period_start
from router_ml.decision.ledger.records import COLUMNS, LedgerError

# the record helpers other ledgers share, still importable from here
from router_ml.decision.ledger.records import _check_record as _check_record
from router_ml.decision.ledger.records import _entries_frame as _entries_frame
from router_ml.decision.ledger.sqlite import APPLICATION_ID, SCHEMA_VERSION, BudgetLedger

__all__ = [
    "APPLICATION_ID",
    "COLUMNS",
    "PERIODS",
    "SCHEMA_VERSION",
    "BudgetLedger",
    "LedgerError",
    "MemoryLedger",
    "open_ledger",
    "period_start",
]


def open_ledger(spec: str | os.PathLike | None) -> Any:
    """A ledger from a config value: ``None``/``"memory"`` -> :class:`MemoryLedger`;
    ``"redis://..."`` -> a Redis ledger shared by proxy replicas; ``"sqlite:<path>"`` or a plain
    path -> :class:`BudgetLedger` on that file."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "memory")):
        return MemoryLedger()
    text = os.fspath(spec)
    if text.startswith(("redis://", "rediss://", "unix://")):
        from router_ml.decision.ledger.redis import RedisLedger

        return RedisLedger(text)
    if text.startswith("sqlite:"):
        text = text[len("sqlite:") :]
        if not text:
            raise ValueError("ledger spec 'sqlite:' needs a path, e.g. 'sqlite:runs/spend.sqlite'")
    return BudgetLedger(text)
