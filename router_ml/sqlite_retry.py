"""Retrying SQLite's immediate "database is locked" answers.

SQLite skips its busy handler where waiting could deadlock, e.g. while another process switches a
new file to WAL, and answers "database is locked" at once. The embedding cache and the spend
ledger open their files through :func:`retry_locked` so that concurrent openers wait instead.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def is_locked(err: sqlite3.OperationalError) -> bool:
    """True for SQLite's transient lock errors ("database is locked", "database table is locked", "busy")."""
    text = str(err).lower()
    return "locked" in text or "busy" in text


def retry_locked(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn``, retrying with backoff for up to ``timeout_s`` while SQLite answers "locked"."""
    deadline, delay = time.monotonic() + timeout_s, 0.002
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as err:
            if not is_locked(err) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.1)
