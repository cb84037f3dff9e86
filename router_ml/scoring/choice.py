"""Multiple-choice scorer: read the chosen letter out of a free-text answer, compare with the gold one.

Where the letter is looked for, most explicit first (the last match of the first pattern that
matches wins, so a corrected answer counts):

1. an answer statement: ``answer is (B)``, ``Answer: B``, ``correct option is B``, ``\\boxed{B}``;
2. a JSON ``"answer": "B"`` field;
3. the answer opening with the letter: ``B`` alone, ``(B)``, ``B.``, ``B)``, ``**B**``;
4. a lone letter in parentheses anywhere, ``(B)``, when exactly one distinct letter is so marked.

No letter found -> value 0 and ``extracted`` None (an unreadable answer is a wrong answer).
"""

from __future__ import annotations

import re
from typing import Any

from router_ml.scoring.base import Example, Score, ScoringError, StringScorer, require_reference


class ChoiceScorer(StringScorer):
    """``letters``: the option letters allowed (default A-J, MMLU-Pro's ten)."""

    name = "choice"
    version = "1"

    def __init__(self, letters: str = "ABCDEFGHIJ") -> None:
        self.letters = letters

    def get_params(self) -> dict[str, Any]:
        return {"letters": self.letters}

    def _patterns(self) -> list[re.Pattern[str]]:
        L = f"[{re.escape(self.letters)}]"
        return [
            re.compile(
                rf"(?i:answer|option|choice)\s*(?i:is|:|=)?\s*(?i:is\s*)?(?i:option\s*|choice\s*)?[*_\s]*[\(\[]?({L})[\)\]]?(?![A-Za-z])"
            ),
            re.compile(rf"\\boxed\{{\s*(?:\\text\{{)?\(?({L})\)?\}}"),
            re.compile(rf"\"answer\"\s*:\s*\"\(?({L})\)?[\"\s.)]"),
            re.compile(rf"^\s*[*_]*[\(\[]?({L})(?:[\)\].:]|[*_]+|\s*$)"),
        ]

    def extract(self, text: str) -> str | None:
        """The chosen letter, or None."""
        for pat in self._patterns():
            hits = pat.findall(text)
            if hits:
                return hits[-1].upper()
        marked = set(re.findall(rf"\(([{re.escape(self.letters)}])\)", text))
        return marked.pop() if len(marked) == 1 else None

    def score_one(self, ex: Example) -> Score:
        gold = require_reference(self.name, ex).strip().strip("()").strip().upper()
        if len(gold) != 1 or gold not in self.letters.upper():
            raise ScoringError(
                f"scorer 'choice': reference {ex.reference!r} is not one of the letters {self.letters}"
            )
        got = self.extract(ex.answer)
        return self.make(float(got == gold), extracted=got)
