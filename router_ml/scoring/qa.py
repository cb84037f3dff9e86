"""Reference-based QA scorer: exact match and token F1 after SQuAD's answer normalisation.

Normalisation (SQuAD v1.1's evaluation script): lower case, drop punctuation, drop the articles
*a, an, the*, collapse whitespace. ``reference`` may hold several acceptable answers, one per line
or as a JSON list; the best match counts. ``metric`` picks what ``value`` is: ``"f1"`` (default;
``extracted`` records the exact-match verdict too) or ``"em"``.

A long answer is cut to its answer statement when it has one (``Answer: ...``, ``the answer is
...``), so a model that reasons before answering is not penalised for the reasoning.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from typing import Any

from router_ml.scoring.base import Example, Score, ScoringError, StringScorer, require_reference

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_STATEMENT = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def references(reference: str) -> list[str]:
    """Acceptable answers: a JSON list of strings, or one per line."""
    text = reference.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return [line for line in text.splitlines() if line.strip()]


def answer_part(answer: str) -> str:
    """The answer statement's text when there is one (the last), else the whole answer."""
    hits = _STATEMENT.findall(answer)
    return hits[-1].strip() if hits else answer.strip()


class QAScorer(StringScorer):
    name = "qa"
    version = "1"

    def __init__(self, metric: str = "f1") -> None:
        if metric not in ("f1", "em"):
            raise ScoringError(f"scorer 'qa': metric must be 'f1' or 'em', not {metric!r}")
        self.metric = metric

    def get_params(self) -> dict[str, Any]:
        return {"metric": self.metric}

    def score_one(self, ex: Example) -> Score:
        golds = references(require_reference(self.name, ex))
        pred = answer_part(ex.answer)
        em = max(exact_match(pred, g) for g in golds)
        f1 = max(token_f1(pred, g) for g in golds)
        return self.make(f1 if self.metric == "f1" else em, extracted=pred[:200],
                         detail=json.dumps({"em": em, "f1": round(f1, 6)}))  # fmt: skip
