"""Score cache: re-scoring a store is a lookup, not a rerun (no sandbox runs, no judge calls).

One SQLite file (WAL journal, one transaction per batch, so a crash loses at most the batch being
written and never corrupts what was committed). A verdict is keyed by the scorer's fingerprint
(name, version, parameters) and the sha256 of the example's content (prompt, answer, reference,
tests, entry point): bumping a scorer's version or changing its parameters misses the cache, as it
should. Failed scores (``error`` set: a judge backend down) are never cached, so they are retried.

    cache = ScoreCache(".router-ml/scores.sqlite")
    scores = score_examples(MathScorer(), examples, cache=cache)   # tqdm progress; hits skip work
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from router_ml.scoring.base import Example, Score, Scorer
from router_ml.sqlite_retry import retry_locked

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    fingerprint TEXT NOT NULL,
    digest TEXT NOT NULL,
    scorer TEXT NOT NULL,
    version TEXT NOT NULL,
    value REAL,
    extracted TEXT,
    cost_usd REAL NOT NULL,
    detail TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (fingerprint, digest)
)
"""


class ScoreCache:
    """Cached verdicts in the SQLite file ``path`` (created with its folder)."""

    def __init__(self, path: str | os.PathLike, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False)
        retry_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"), timeout_s)
        retry_locked(lambda: self._db.execute(_SCHEMA), timeout_s)
        self._db.commit()
        self._timeout_s = timeout_s

    def get(self, scorer: Scorer, digests: Sequence[str]) -> dict[str, Score]:
        """Cached scores of ``scorer`` for these example digests (missing ones left out)."""
        fp, out = scorer.fingerprint(), {}
        for i in range(0, len(digests), 500):
            chunk = list(digests[i : i + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT digest, scorer, version, value, extracted, cost_usd, detail FROM scores "
                f"WHERE fingerprint = ? AND digest IN ({marks})",
                [fp, *chunk],
            )
            for d, name, version, value, extracted, cost, detail in rows:
                out[d] = Score(value, name, version, extracted=extracted, cost_usd=cost, detail=detail)
        return out

    def put(self, scorer: Scorer, digests: Sequence[str], scores: Sequence[Score]) -> int:
        """Store the successful ones of ``scores`` (one transaction); returns how many were stored."""
        fp, now = scorer.fingerprint(), time.time()
        rows = [(fp, d, s.scorer, s.version, s.value, s.extracted, s.cost_usd, s.detail, now)
                for d, s in zip(digests, scores, strict=True) if s.ok]  # fmt: skip

        def write() -> None:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?,?,?)", rows)

        retry_locked(write, self._timeout_s)
        return len(rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def score_examples(
    scorer: Scorer,
    examples: Sequence[Example],
    *,
    cache: ScoreCache | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> list[Score]:
    """Score ``examples`` in order, reading and writing ``cache``; a batch is committed as it ends."""
    digests = [ex.digest() for ex in examples]
    known = cache.get(scorer, digests) if cache is not None else {}
    out: list[Score | None] = [known.get(d) for d in digests]
    todo = [i for i, s in enumerate(out) if s is None]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"score {scorer.name}",
               disable=not progress, unit="ans")  # fmt: skip
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        scores = scorer.score([examples[i] for i in idx])
        for i, s in zip(idx, scores, strict=True):
            out[i] = s
        if cache is not None:
            cache.put(scorer, [digests[i] for i in idx], scores)
        bar.update(len(idx))
    bar.close()
    return [s for s in out if s is not None]
