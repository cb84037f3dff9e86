"""Math scorer: read the final answer out of a worked solution, check it equals the gold answer.

GSM8K style (``#### 72`` gold, a number answer with ``$``, commas or units) and MATH style (LaTeX
gold such as ``\\frac{3}{4}``, answers in ``\\boxed{}``). Where the final answer is looked for, most
explicit first:

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces);
2. the last ``#### ...`` line (GSM8K's own format);
3. a JSON ``"answer": ...`` field;
4. the last answer statement (``the answer is ...``, ``Answer: ...``, ``final answer: ...``);
5. failing all of them: a short one-line answer as a whole (``-1, 1``, ``5 apples``), else the last
   number in the text.

Equivalence: when both sides read as plain numbers (``$1,234.00``, ``18 dollars``, ``3/4``,
``\\frac{3}{4}``, ``50\\%``) they are compared as numbers (relative tolerance 1e-6), and a numeric
gold answer is compared with the number a worded answer states (:func:`number_in_text`); otherwise
both are parsed by HF ``math-verify`` (LaTeX and plain expressions through SymPy) and compared
symbolically. An unreadable answer scores 0.
"""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any

from router_ml.scoring.base import Example, Score, StringScorer, require_reference

_NUM = r"-?\d+(?:\.\d+)?"
_STATEMENT = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*(?:is\s*)?:?\s*(.+)", re.IGNORECASE
)


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        rest = text[start + len("\\boxed") :].strip()  # "\boxed 5"
        return rest.split()[0].rstrip("$.") if rest else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def _json_answer(text: str) -> str | None:
    hits = re.findall(r"\"answer\"\s*:\s*(\"(?:[^\"\\]|\\.)*\"|-?[\d.,/]+)", text)
    if not hits:
        return None
    raw = hits[-1]
    try:
        value = json.loads(raw) if raw.startswith('"') else raw
    except json.JSONDecodeError:
        value = raw.strip('"')
    return str(value).strip()


def extract_answer(text: str) -> tuple[str | None, str]:
    """(the final answer text, where it was found: boxed / hashes / json / statement / last_number)."""
    b = boxed(text)
    if b:
        return b, "boxed"
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip(), "hashes"
    j = _json_answer(text)
    if j:
        return j, "json"
    statements = [m.group(1).strip() for m in _STATEMENT.finditer(text)]
    for s in reversed(statements):
        n = re.search(_NUM, s.replace(",", ""))
        if n or "\\" in s:
            return s, "statement"
    nums = re.findall(_NUM, re.sub(r"(?<=\d),(?=\d{3})", "", text))
    return (nums[-1], "last_number") if nums else (None, "none")


def _clean(s: str) -> str:
    s = s.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|textbf|mathbf)\{([^}]*)\}", r"\1", s)
    for tok in ("\\$", "$", "\\,", "\\!", "\\left", "\\right", "{,}"):
        s = s.replace(tok, "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = s.replace("\\%", "%").strip()
    s = s.rstrip(".").strip()
    return s


def as_number(s: str | None) -> float | None:
    """A plain number read from an answer string (``$1,234``, ``18 dollars``, ``3/4``, ``\\frac{3}{4}``,
    ``50%``), or None when the string is something else (an expression, an interval, text)."""
    if s is None:
        return None
    t = _clean(s)
    m = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)\s*/\s*(\d+)", t)
    if m:
        a, b = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        return int(a) / int(b) if int(b) else None
    m = re.fullmatch(rf"({_NUM})\s*%?(?:\s*[A-Za-z][A-Za-z .'/-]*)?", t)
    if m:
        return float(m.group(1))
    return None


def number_in_text(s: str) -> float | None:
    """The number a short worded answer states: the one after its last ``=`` (``2 + 8 + 6 = 16``), else
    its leading number (``4 (3 onions and 1 potato)``, ``2:00 pm``), else its last number
    (``Jackson is 4 years old.``); None when it has none or is LaTeX (left to math-verify)."""
    if "\\" in s:
        return None
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
    if re.fullmatch(rf"\s*{_NUM}(?:\s*,\s*{_NUM})+\s*\.?\s*", s):
        return None  # a list of values ("2, -1"): a set, compared by math-verify
    if "=" in s:
        after = re.search(rf"^\s*\$?\s*({_NUM})", s.rsplit("=", 1)[1])
        if after:
            return float(after.group(1))
    lead = re.match(rf"\s*\$?\s*({_NUM})", s)
    if lead:
        return float(lead.group(1))
    nums = re.findall(_NUM, s)
    return float(nums[-1]) if nums else None


def gold_answer(reference: str) -> str:
    """The gold answer string: GSM8K's ``#### 72`` (or a full solution ending so) -> ``72``; a boxed
    MATH solution -> the boxed part; anything else as given."""
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    b = boxed(reference)
    if b:
        return b
    return reference.strip().lstrip("#").strip()


def equivalent(gold: str, pred: str, timeout_s: int = 5) -> bool:
    """Numeric equality when both are plain numbers, else symbolic equality through math-verify."""
    g, p = as_number(gold), as_number(pred)
    if g is not None and p is None:
        p = number_in_text(pred)
    if g is not None and p is not None:
        return math.isclose(g, p, rel_tol=1e-6, abs_tol=1e-9)
    if _clean(gold) == _clean(pred):
        return True
    from math_verify import parse, verify  # SymPy behind it: imported only when needed

    # math-verify's time limits are SIGALRM-based, which only the main thread can use: elsewhere
    # they would make every call fail, so SymPy runs without one there
    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        pg = parse(f"${_clean(gold)}$", parsing_timeout=limit)
        pp = parse(f"${_clean(pred)}$", parsing_timeout=limit)
        return bool(pg and pp and verify(pg, pp, timeout_seconds=limit))
    except Exception:  # math-verify raises on pathological input; an unreadable answer is wrong
        return False


class MathScorer(StringScorer):
    """GSM8K / MATH answer equivalence; ``extracted`` is ``"<where>: <answer>"``."""

    name = "math"
    version = "1"

    def __init__(self, timeout_s: int = 5) -> None:
        self.timeout_s = timeout_s

    def get_params(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s}

    def score_one(self, ex: Example) -> Score:
        gold = gold_answer(require_reference(self.name, ex))
        pred, where = extract_answer(ex.answer)
        short = ex.answer.strip()
        if where == "last_number" and "\n" not in short and len(short) <= 60:
            pred, where = short, "whole"  # a bare short answer ("-1, 1", "5 apples") is read whole
        if pred is None:
            return self.make(0.0, extracted=None)
        return self.make(float(equivalent(gold, pred, self.timeout_s)), extracted=f"{where}: {pred}")
