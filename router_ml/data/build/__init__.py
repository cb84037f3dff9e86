"""Rebuild each data set's files from its upstream raw form: ``router-ml data build NAME``.

``manifest.json`` pins every source: upstream repository and revision, the raw files (their
upstream paths and, where known, sha256), and the files the adapters read (the reference copy's
size and sha256). One builder per source turns ``raw_dir/<upstream path>`` into
``out_dir/<file the adapter reads>``:

    build_source("llmrouter", raw_dir, out_dir)                # -> BuildReport(rows per file)
    build_source("routellm", raw_dir, out_dir, exclude=texts)  # also drop these prompt texts

``exclude`` drops prompts by exact text (the reference copies left out the prompts of the
project's held-out test set, which is not public; see each PROVENANCE.md).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any


class BuildError(ValueError):
    """A raw file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class RawFile:
    """One upstream file: its path in the repository at the pinned revision."""

    path: str
    sha256: str | None  # None: the exact upstream file is not available to pin (see note)
    note: str = ""


@dataclass(frozen=True)
class BuiltFile:
    """One file an adapter reads, as in the reference copy."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Source:
    """A data set: where its raw files come from and which files its build writes."""

    name: str
    folder: str
    repo: str
    revision: str
    licence: str
    raw: tuple[RawFile, ...]
    built: tuple[BuiltFile, ...]
    note: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Size of the built files (the reference copy)."""
        return sum(f.bytes for f in self.built)


@dataclass
class BuildReport:
    """Rows written per built file and rows left out per reason."""

    source: str
    rows: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


@cache
def sources() -> dict[str, Source]:
    """Every source of ``manifest.json``, by short name (the adapters' registry keys)."""
    raw = json.loads((Path(__file__).with_name("manifest.json")).read_text(encoding="utf-8"))
    return {
        name: Source(
            name=name,
            folder=s["folder"],
            repo=s["repo"],
            revision=s["revision"],
            licence=s["licence"],
            raw=tuple(RawFile(**r) for r in s["raw"]),
            built=tuple(BuiltFile(**b) for b in s["built"]),
            note=s.get("note", ""),
            options=s.get("options", {}),
        )
        for name, s in raw.items()
    }


def get_source(name: str) -> Source:
    """A source by short name (``llmrouter``) or folder (``llmrouter_ulab``)."""
    known = sources()
    if name in known:
        return known[name]
    for s in known.values():
        if s.folder == name:
            return s
    raise KeyError(
        f"unknown data source {name!r}; known: {sorted(known)} (or their folders "
        f"{sorted(s.folder for s in known.values())})"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def raw_path(raw_dir: Path, rel: str) -> Path:
    """``raw_dir/rel``, or a BuildError naming the missing upstream file."""
    path = Path(raw_dir) / rel
    if not path.is_file():
        raise BuildError(f"raw file {rel!r} not found under {str(raw_dir)!r}")
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BuildError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def read_exclude(file: str | os.PathLike) -> frozenset[str]:
    """Prompt texts to leave out: a JSONL file with one JSON string per line."""
    texts = []
    with Path(file).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise BuildError(f"{file}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(value, str):
                raise BuildError(f"{file}:{lineno}: expected a JSON string (a prompt text)")
            texts.append(value)
    return frozenset(texts)


# short name -> module under router_ml.data.build with ``build(src, raw_dir, out_dir, exclude, report)``
BUILDERS: dict[str, str] = {
    "llmrouter": "llmrouter",
    "routerbench": "tables",
    "routellm": "tables",
    "routerdc": "tables",
    "mmlu_pro": "mmlu_pro",
    "zeroeval": "zeroeval",
    "alpaca_eval": "alpaca_eval",
}


def build_source(
    name: str,
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    exclude: Iterable[str] = (),
) -> BuildReport:
    """Build source ``name`` from ``raw_dir`` into ``out_dir`` (written whole, then moved in place)."""
    src = get_source(name)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report = BuildReport(src.name)
    module = importlib.import_module(f"router_ml.data.build.{BUILDERS[src.name]}")
    try:
        module.build(src, Path(raw_dir), tmp, frozenset(exclude), report)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def matches_reference(src: Source, out_dir: Path) -> dict[str, bool]:
    """Per built file: is it byte-identical to the reference copy (sha256 in the manifest)?"""
    return {
        f.name: (out_dir / f.name).is_file() and sha256_file(out_dir / f.name) == f.sha256 for f in src.built
    }


__all__ = [
    "BUILDERS",
    "BuildError",
    "BuildReport",
    "BuiltFile",
    "RawFile",
    "Source",
    "build_source",
    "get_source",
    "matches_reference",
    "read_exclude",
    "sha256_file",
    "sources",
]
