"""pydantic validation errors of configuration files, in the words the project's errors use.

:func:`field_problem` turns the first error of a ``ValidationError`` into
``field 'prices.input_per_mtok' = -1.0: Input should be greater than or equal to 0``; the caller
puts the file and the backend in front. A validator that raises :class:`Hidden` keeps the value out
of the message (an API key pasted where its variable's name belongs).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

HIDDEN = "hidden_value"


def Hidden(message: str) -> PydanticCustomError:
    """A validation error whose message must not show the offending value."""
    return PydanticCustomError(HIDDEN, message)


def dotted(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a path: ``('messages', 0, 'role')`` -> ``messages[0].role``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def field_problem(
    err: ValidationError, allowed: dict[tuple[str, ...], list[str]] | None = None, noun: str = "field"
) -> str:
    """The first problem of ``err``, naming the field (``allowed``: the known keys of a mapping at
    a location, listed when an unknown key is met there; ``noun``: what a field is called)."""
    e = err.errors(include_url=False)[0]
    loc, kind, msg = tuple(e["loc"]), e["type"], e["msg"]
    if kind == "value_error":  # a validator's own words, without pydantic's "Value error, "
        msg = str(e["ctx"]["error"])
    if not loc:  # a rule across fields: the validator's message names them
        return msg
    field = dotted(loc)
    if kind == "extra_forbidden":
        keys = (allowed or {}).get(tuple(str(p) for p in loc[:-1]))
        return f"unknown {noun} {field!r}" + (f"; allowed fields: {keys}" if keys else "")
    if kind == "missing":
        return f"{noun} {field!r} is missing"
    shown = "" if kind == HIDDEN else f" = {e['input']!r}"
    return f"{noun} {field!r}{shown}: {msg}"
