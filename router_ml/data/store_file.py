"""What the data layer knows of a collection store's SQLite file: how to recognise one and read it.

The store itself (:mod:`router_ml.collect.store`) writes the file; its readers live here, one level
down, so that a collected store loads as a data set (:mod:`router_ml.data.adapters.collected`)
without the data layer importing the collection harness. Both sides share :data:`APPLICATION_ID`,
:data:`SCHEMA_VERSION` and the queries below: the SQL of a store is written once.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pandas as pd

#: Schema version in ``PRAGMA user_version``; a newer file is refused, not guessed at.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` that marks a SQLite file as a router-ml collection store ("RMCS").
APPLICATION_ID = 0x524D4353

#: One row per (prompt, model) called: its answer, or its latest error while it has none; the
#: prompt's text, task, reference and tests alongside.
ANSWERS_SQL = """SELECT p.prompt, p.task, p.reference, p.tests, p.source, c.*
    FROM calls c JOIN prompts p USING (prompt_id)
    WHERE c.call_id IN (
        SELECT COALESCE(MAX(CASE WHEN ok = 1 THEN call_id END), MAX(call_id))
        FROM calls GROUP BY prompt_id, model)
    ORDER BY c.call_id"""
#: Every stored verdict, with when its (scorer, version) last scored anything in the store.
SCORES_SQL = """SELECT s.*, MAX(s.scored_at) OVER (PARTITION BY s.scorer, s.version) AS version_scored_at
    FROM scores s ORDER BY s.prompt_id, s.model, s.scorer, s.version"""


class StoreFileError(ValueError):
    """A file that is not a usable collection store (missing, another SQLite file, newer schema)."""


def check_store(db: sqlite3.Connection, path: str | os.PathLike) -> None:
    """Raise :class:`StoreFileError` unless ``db`` is a collection store this code can read."""
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise StoreFileError(
            f"store {str(path)!r} is a SQLite file but not a collection store (application_id {app_id})"
        )
    if version > SCHEMA_VERSION:
        raise StoreFileError(
            f"store {str(path)!r}: schema version {version} is newer than this code's {SCHEMA_VERSION}"
        )


def open_store(path: str | os.PathLike) -> sqlite3.Connection:
    """A read-only connection to the store at ``path``, checked (:func:`check_store`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise StoreFileError(f"store {str(path)!r} not found" + (" (a directory)" if path.is_dir() else ""))
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        check_store(db, path)
    except sqlite3.DatabaseError as err:
        raise StoreFileError(f"store {str(path)!r} cannot be read as a SQLite file: {err}") from None
    return db


def read_answers(db: sqlite3.Connection) -> pd.DataFrame:
    """:data:`ANSWERS_SQL` as a frame."""
    return pd.read_sql_query(ANSWERS_SQL, db)


def read_scores(db: sqlite3.Connection) -> pd.DataFrame:
    """:data:`SCORES_SQL` as a frame."""
    return pd.read_sql_query(SCORES_SQL, db)
