"""JSON Lines reading shared by every loader: blank lines skipped, errors name ``file:line``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(file: Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(where, lineno, value)`` per non-blank line; invalid JSON raises ``error`` naming where."""
    with Path(file).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            yield where, lineno, value
