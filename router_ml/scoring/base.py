"""What every scorer shares: the :class:`Example` it reads, the :class:`Score` it writes, its contract.

A scorer turns one model answer into a quality label in [0, 1] (1 = correct / best). Each has a
``name`` (its registry key), a ``version`` (bumped whenever a change could alter a verdict) and
parameters (``get_params()``); the three together, :meth:`Scorer.fingerprint`, identify its verdicts
in the score cache and are stored next to every score.

Scorers work on batches, ``score(examples) -> list[Score]`` in order, so that the LLM judge can
send its calls concurrently; the string scorers just loop.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


class ScoringError(ValueError):
    """Bad scorer input or configuration; the message names the scorer, field or row."""


@dataclass(frozen=True)
class Example:
    """One answer to score: the ``prompt`` sent, the model's ``answer``, and what it is checked against.

    ``reference``: the gold answer (a letter, a number or LaTeX expression, a text) or, for the
    pairwise judge, the reference model's answer; ``tests``: Python test code for the code scorer
    (asserts, or a HumanEval-style ``check(candidate)`` plus ``entry_point``); ``task``: the task
    name that chooses the scorer (:func:`router_ml.scoring.registry.scorer_name_for`).
    """

    prompt: str
    answer: str
    reference: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    task: str | None = None

    def digest(self) -> str:
        """sha256 of everything a verdict may depend on (the cache key's content half)."""
        parts = (self.prompt, self.answer, self.reference, self.tests, self.entry_point)
        blob = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Score:
    """One verdict. ``value`` in [0, 1], None when scoring failed (``error`` says why: a judge backend
    down, an unparsable verdict). ``extracted``: the answer the scorer read out of the text (a letter,
    a number, a program's first line...), for audit. ``cost_usd``: what the verdict cost when it was
    made (the judge's calls; served from the cache it costs nothing again). ``detail``: scorer-specific JSON text (the judge's raw verdicts, a test's failure)."""

    value: float | None
    scorer: str
    version: str
    extracted: str | None = None
    error: str | None = None
    cost_usd: float = 0.0
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.value is not None


class Scorer(ABC):
    """The contract: class attributes ``name`` and ``version``; ``score`` a batch, in order."""

    name: ClassVar[str]
    version: ClassVar[str]

    def get_params(self) -> dict[str, Any]:
        """Parameters that change verdicts (JSON-serialisable); part of the fingerprint."""
        return {}

    def fingerprint(self) -> str:
        """``name@version`` plus a digest of the parameters: what a cached verdict is valid for."""
        params = json.dumps(self.get_params(), sort_keys=True, default=str)
        return f"{self.name}@{self.version}:{hashlib.sha256(params.encode()).hexdigest()[:12]}"

    def make(self, value: float | None, **kw: Any) -> Score:
        """A :class:`Score` stamped with this scorer's name and version."""
        return Score(value=value, scorer=self.name, version=self.version, **kw)

    @abstractmethod
    def score(self, examples: Sequence[Example]) -> list[Score]:
        """One :class:`Score` per example, in order."""


class StringScorer(Scorer):
    """A scorer that reads one example at a time with no outside calls (``score_one``)."""

    @abstractmethod
    def score_one(self, ex: Example) -> Score: ...

    def score(self, examples: Sequence[Example]) -> list[Score]:
        return [self.score_one(ex) for ex in examples]


def require_reference(scorer: str, ex: Example) -> str:
    if ex.reference is None or not str(ex.reference).strip():
        raise ScoringError(f"scorer {scorer!r}: the example has no 'reference' (gold answer) to compare with")
    return str(ex.reference)
