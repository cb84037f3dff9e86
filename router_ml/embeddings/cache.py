"""On-disk embedding cache: SQLite (WAL) keyed by ``(encoder.id, sha256(text))``.

One database file, ``<cache_dir>/embeddings.sqlite`` (default ``router_ml.paths.cache_dir() /
"embeddings"``). Missing texts are encoded in chunks and each chunk is committed in its own
transaction, so a killed process loses at most the chunk in flight and never leaves a corrupt
cache; SQLite's locking lets several processes read and write the same file at once (a writer
waits for the lock instead of failing). Vectors are stored as float32 bytes with their dim, which
is checked on every read.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router_ml.embeddings.base import (
    Encoder,
    LayeredEncoder,
    check_layers,
    check_texts,
    empty_embeddings,
    want_progress,
)
from router_ml.paths import cache_dir as default_cache_root
from router_ml.sqlite_retry import retry_locked

DB_NAME = "embeddings.sqlite"
#: Texts encoded and committed per transaction (what a kill can lose at most).
WRITE_CHUNK = 512
_LOOKUP_CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's variable limit
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    encoder_id TEXT NOT NULL,
    text_sha256 BLOB NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (encoder_id, text_sha256)
) WITHOUT ROWID
"""


def text_key(text: str) -> bytes:
    """The 32-byte sha256 of a text's UTF-8 bytes (the cache key next to the encoder id)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


class CachedEncoder:
    """Wraps an encoder with the on-disk cache; ``id``, ``dim``, ``get_config`` are the inner one's.

    ``encode(texts)`` -> ``(n, dim)`` float32 in input order; only texts missing from the cache are
    encoded (duplicates once), then stored.
    """

    def __init__(
        self, encoder: Encoder, cache_dir: str | os.PathLike | None = None, timeout_s: float = 60.0
    ) -> None:
        self.encoder = encoder
        folder = (
            Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "embeddings"
        )
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / DB_NAME
        self.timeout_s = float(timeout_s)
        self._local = threading.local()  # one connection per thread (and per process, see _conn)
        self._layered: dict[tuple[int, ...], CachedEncoder] = {}

    @property
    def id(self) -> str:
        return self.encoder.id

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def get_config(self) -> dict[str, Any]:
        return self.encoder.get_config()

    def __repr__(self) -> str:
        return f"CachedEncoder({self.encoder!r}, path={str(self.path)!r})"

    # ------------------------------------------------------------------ storage
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # isolation_level=None: no implicit transactions; each write batch is BEGIN IMMEDIATE..COMMIT
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            # a new file's switch to WAL can answer "locked" at once while another process does it
            mode = retry_locked(
                lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0], self.timeout_s
            )
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, expected 'wal'")
            conn.execute("PRAGMA synchronous = NORMAL")  # durable across process kills in WAL mode
            retry_locked(lambda: conn.execute(_SCHEMA), self.timeout_s)
        except sqlite3.DatabaseError as err:
            conn.close()
            raise RuntimeError(f"embedding cache {str(self.path)!r} cannot be opened: {err}") from err
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (a later call reopens it)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """Cached ``(dim,)`` vectors for the given text keys (absent keys are left out)."""
        dim, found = self.dim, {}
        conn = self._conn()
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = list(keys[start : start + _LOOKUP_CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                "SELECT text_sha256, dim, vector FROM embeddings"
                f" WHERE encoder_id = ? AND text_sha256 IN ({marks})",
                [self.id, *chunk],
            ).fetchall()
            for key, row_dim, blob in rows:
                if row_dim != dim or len(blob) != 4 * dim:
                    raise ValueError(
                        f"embedding cache {str(self.path)!r} holds a {row_dim}-dim vector "
                        f"({len(blob)} bytes) for encoder {self.id!r}, which has dim {dim}; the encoder "
                        "changed under the same id: delete the cache file or give the encoder a new id"
                    )
                found[bytes(key)] = np.frombuffer(blob, dtype=np.float32)
        return found

    def store(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Write ``vectors`` ``(n, dim)`` under ``keys`` in one transaction (existing rows kept)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"store: expected vectors of shape {(len(keys), self.dim)}, got {vectors.shape}")
        rows = [(self.id, k, self.dim, v.tobytes()) for k, v in zip(keys, vectors, strict=True)]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR IGNORE INTO embeddings (encoder_id, text_sha256, dim, vector) VALUES (?, ?, ?, ?)",
                rows,
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def count(self) -> int:
        """Number of vectors cached for this encoder id."""
        return (
            self._conn()
            .execute("SELECT COUNT(*) FROM embeddings WHERE encoder_id = ?", [self.id])
            .fetchone()[0]
        )

    # ------------------------------------------------------------------ encoding
    def encode_layers(
        self,
        texts: Sequence[str],
        layers: Sequence[int],
        batch_size: int = 64,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """The inner encoder's ``encode_layers``, cached in the same file under its own id."""
        key = check_layers(layers)
        sibling = self._layered.get(key)
        if sibling is None:
            sibling = CachedEncoder(LayeredEncoder(self.encoder, key), self.path.parent, self.timeout_s)
            self._layered[key] = sibling
        return sibling.encode(texts, batch_size=batch_size, show_progress=show_progress)

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool | None = None
    ) -> np.ndarray:
        """``texts`` (n,) -> ``(n, dim)`` float32 in input order, encoding only cache misses."""
        texts = check_texts(texts)
        if not texts:
            return empty_embeddings(self.dim)
        keys = [text_key(t) for t in texts]
        unique = dict(zip(keys, texts, strict=True))  # key -> text, first occurrence, insertion order
        found = self.lookup(list(unique))
        todo = [k for k in unique if k not in found]
        if todo:
            bar = None
            if want_progress(show_progress, len(todo)):
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo), desc=f"embed {self.id}", unit="text")
            try:
                for start in range(0, len(todo), WRITE_CHUNK):
                    chunk = todo[start : start + WRITE_CHUNK]
                    vecs = self.encoder.encode(
                        [unique[k] for k in chunk], batch_size=batch_size, show_progress=False
                    )
                    self.store(chunk, vecs)
                    found.update(zip(chunk, vecs, strict=True))
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
