"""ZeroEval's own verdicts (yuchenlin/ZeroEval, ``src/evaluation/math_eval.py`` and ``crux_eval.py``),
reimplemented so that ``zeroeval_math_code`` can be rebuilt from the raw model outputs.

ZeroEval prompts for a JSON ``{"reasoning": ..., "answer": ...}`` reply. The answer is read from
the output (``output[0]``) by, in order:

1. the first complete ``{...}`` object (braces balanced), parsed as JSON with newlines removed
   (a parse failure there ends this step: later objects are not tried);
2. regular expressions for ``"answer": "..."`` (then with the quotes unbalanced, then unquoted
   values, then an unquoted key);
3. for models whose name contains ``Llama-3.1``: a ``\\boxed{word}``; ZeroEval stores the dict
   ``{'answer': word}`` as the answer, so its text form is what is compared.

Verdicts, given the answer found (none found: ``"No answer extracted"``, wrong):

- ``gsm`` / ``math-l5``: both sides lose ``$`` and commas; a side containing ``/`` that is plain
  arithmetic is evaluated to a float (ZeroEval calls ``eval``; here a small arithmetic-only
  evaluator, as the reference copy restricted it); then the *first number* of each side is
  compared as floats. (So ``\\frac{1}{2}`` counts as 1, and ``3\\sqrt{2}`` as 3: ZeroEval's rule, not
  a sound math check; :class:`~router_ml.scoring.math_answer.MathScorer` is the sound one.)
- ``crux``: the answer's text without surrounding quotes (newlines written ``\\n``) must equal the
  gold literal without its quotes, exactly.

These are the ``zeroeval`` scorer's rules; its ``extracted`` is the answer text as the reference
copy's ``model_answer`` column holds it, ``detail`` the verdict (``matched``).
"""

from __future__ import annotations

import ast
import contextlib
import json
import operator
import re
from typing import Any

from router_ml.scoring.base import Example, Score, ScoringError, StringScorer, require_reference

TASKS = ("gsm", "math-l5", "crux")
NO_ANSWER = "No answer extracted"
_MISSING = object()


def first_json_object(text: str) -> dict | None:
    """The first balanced ``{...}`` in ``text`` parsed as JSON (newlines dropped); None if none or
    if that one fails to parse."""
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                try:
                    value = json.loads(text[start : i + 1].replace("\n", ""))
                except json.JSONDecodeError:
                    return None
                return value if isinstance(value, dict) else None
    return None


def json_fields(text: str, keys: tuple[str, ...] = ("reasoning", "answer")) -> dict[str, str]:
    """Values of ``keys`` read by regular expressions from JSON-like text that did not parse."""
    found: dict[str, str] = {}
    for key in keys:
        k = re.escape(key)
        m = re.search(rf'"{k}"\s*:\s*"([^"]*?)"', text) or re.search(rf'"{k}"\s*:\s*"(.*?)"', text, re.DOTALL)
        if m is None:
            m = re.search(rf'"{k}"\s*:\s*([^,\s]*)', text) or re.search(rf"{k}\s*:\s*([^,\s]*)", text)
        if m is not None:
            found[key] = m.group(1)
    return found


def find_answer(output: str, model: str = "") -> Any:
    """The answer ZeroEval reads from ``output`` (any JSON value, None included), or ``_MISSING``."""
    obj = first_json_object(output)
    if obj is not None and "answer" in obj:
        return obj["answer"]
    fields = json_fields(output)
    if "answer" in fields:
        return fields["answer"]
    if "Llama-3.1" in model and "boxed" in output:
        m = re.search(r"\\boxed{([\w\d]+)}", output)
        if m:
            return {"answer": m.group(1)}  # ZeroEval stores the whole dict as the answer
    return _MISSING


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip


def _arith(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _arith(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    raise ValueError("not arithmetic")


def sanitize(answer: str) -> str:
    """ZeroEval's ``sanitize_math_answers``: no ``$``, no commas, a fraction evaluated to a float."""
    answer = answer.replace("$", "").strip().replace(",", "")
    if "/" in answer and re.fullmatch(r"[\d\s./()+*-]+", answer):
        with contextlib.suppress(SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
            answer = str(float(_arith(ast.parse(answer, mode="eval"))))
    return answer


def math_verdict(answer: str, gold: str) -> bool:
    """First number of each sanitized side, compared as floats."""
    a = re.search(r"-?\d+(\.\d+)?", sanitize(answer))
    g = re.search(r"-?\d+(\.\d+)?", sanitize(gold.replace("#", "").strip()))
    return bool(a and g and float(a.group()) == float(g.group()))


def crux_answer(answer: Any) -> str:
    return str(answer).strip("'\"").replace("\n", "\\n")


def crux_verdict(answer: str, gold: str) -> bool:
    g = str(gold).strip("'\"")
    return answer == g if (answer and g) else (answer == "" and g == "")


def judge(task: str, output: str, gold: str, model: str = "") -> tuple[str | bool, str | None]:
    """(``matched``: True / False / ``"No answer extracted"``, the answer as ZeroEval records it)."""
    if task not in TASKS:
        raise ScoringError(f"scorer 'zeroeval': unknown task {task!r}; known: {list(TASKS)}")
    found = find_answer(output, model)
    if task == "crux":
        if found is _MISSING:
            return NO_ANSWER, "None"  # the reference copy's crux scorer recorded str(None) here
        answer = crux_answer(found)
        return crux_verdict(answer, gold), answer
    if found is _MISSING:
        return NO_ANSWER, None
    answer = str(found)
    return math_verdict(answer, gold), answer


class ZeroEvalScorer(StringScorer):
    """ZeroEval's verdict for ``task`` (gsm, math-l5, crux); ``model`` only matters for Llama-3.1's
    ``\\boxed`` fallback. ``reference`` is the item's gold ``answer`` field as ZeroEval stores it."""

    name = "zeroeval"
    version = "1"

    def __init__(self, task: str = "gsm", model: str = "") -> None:
        if task not in TASKS:
            raise ScoringError(f"scorer 'zeroeval': unknown task {task!r}; known: {list(TASKS)}")
        self.task = task
        self.model = model

    def get_params(self) -> dict[str, Any]:
        return {"task": self.task, "llama31": "Llama-3.1" in self.model}

    def verdict(self, ex: Example) -> tuple[str | bool, str | None]:
        """(``matched``, the answer as ZeroEval records it) for ``ex.answer`` (the raw output)."""
        return judge(self.task, ex.answer, require_reference(self.name, ex), self.model)

    def score_one(self, ex: Example) -> Score:
        matched, answer = self.verdict(ex)
        return self.make(
            float(matched is True), extracted=answer, detail=json.dumps({"matched": str(matched)})
        )
