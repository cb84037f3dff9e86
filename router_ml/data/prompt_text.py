"""How the sources' raw prompt fields become prompt text, shared by the adapters and the builders.

A builder excludes the rows whose prompt text an adapter would produce, so both read the same
rendering from here (and the builders never import the adapters, which fetch through them).
"""

from __future__ import annotations

import ast
import string


def format_question(question: str, options: list[str]) -> str:
    """``question`` followed by one ``X. option`` line per option (letters A, B, ...)."""
    lines = [f"{string.ascii_uppercase[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join([question.strip(), *lines])


def join_list_string(raw: object) -> str:
    """``"['a', 'b']"`` -> ``"a\\n\\nb"``; anything else -> its string form ('' for NaN)."""
    if not isinstance(raw, str):
        return ""
    try:
        val = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    if isinstance(val, (list, tuple)):
        return "\n\n".join(str(v) for v in val)
    return str(val)
