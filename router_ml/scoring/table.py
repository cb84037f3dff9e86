"""Score a table of answers: rows of (prompt, answer, reference / tests, task) -> the same rows with
their scores. What ``router-ml score`` runs.

Columns read: ``prompt`` and ``answer`` (required), ``reference``, ``tests``, ``entry_point``,
``task`` (optional). Columns added: ``score`` (in [0, 1]; empty when scoring failed),
``scorer`` and ``scorer_version`` (stored next to every score), ``extracted``, ``score_error``,
``score_cost_usd`` and ``score_detail``. Each row goes to the scorer of its task
(:func:`router_ml.scoring.registry.scorer_name_for`) unless one scorer is given for all.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from router_ml.scoring.base import Example, Scorer, ScoringError
from router_ml.scoring.cache import ScoreCache, score_examples
from router_ml.scoring.registry import scorer_name_for

REQUIRED = ("prompt", "answer")
OPTIONAL = ("reference", "tests", "entry_point", "task")


def _text(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def examples_from_frame(df: pd.DataFrame, source: str = "<table>") -> list[Example]:
    """One :class:`Example` per row; a missing column or an empty prompt / answer names the row."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ScoringError(f"{source}: missing column(s) {missing}; found {list(df.columns)}")
    out = []
    for i, row in enumerate(df.to_dict("records")):
        prompt, answer = _text(row["prompt"]), _text(row["answer"])
        if prompt is None or answer is None:
            raise ScoringError(f"{source}: row {i}: 'prompt' and 'answer' must be text")
        out.append(Example(prompt, answer, **{c: _text(row.get(c)) for c in OPTIONAL}))
    return out


def score_frame(
    df: pd.DataFrame,
    get_scorer: Callable[[str], Scorer],
    *,
    scorer: str | None = None,
    cache: ScoreCache | None = None,
    source: str = "<table>",
    progress: bool = True,
) -> pd.DataFrame:
    """``df`` with the score columns; ``get_scorer(name)`` builds (once per name) the scorers used."""
    examples = examples_from_frame(df, source)
    names = []
    for i, ex in enumerate(examples):
        try:
            names.append(scorer or scorer_name_for(ex))
        except ScoringError as err:
            raise ScoringError(f"{source}: row {i}: {err}") from None
    scores: list = [None] * len(examples)
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        try:
            got = score_examples(get_scorer(name), [examples[i] for i in idx], cache=cache, progress=progress)
        except ScoringError as err:
            raise ScoringError(f"{source}: {err}") from None
        for i, s in zip(idx, got, strict=True):
            scores[i] = s
    out = df.copy()
    out["score"] = [s.value for s in scores]
    out["scorer"] = [s.scorer for s in scores]
    out["scorer_version"] = [s.version for s in scores]
    out["extracted"] = [s.extracted for s in scores]
    out["score_error"] = [s.error for s in scores]
    out["score_cost_usd"] = [s.cost_usd for s in scores]
    out["score_detail"] = [s.detail for s in scores]
    return out
