"""Score a collection store: every stored answer gets a verdict in the store's own ``scores`` table.

    with AnswerStore("answers.sqlite") as store:
        summary = score_store(store, build_scorer, cache=ScoreCache(".router-ml/scores.sqlite"))

(``router-ml score --store answers.sqlite``). Each answer goes to the scorer of its prompt's task
(:func:`router_ml.scoring.registry.scorer_name_for`), or to the one ``scorer`` named for all. A
verdict is keyed by (prompt_id, model, scorer, version), so a rerun with the same scorer versions
adds nothing, and a new version adds its own rows beside the old ones. Verdicts are written batch by
batch (a crash loses at most the batch being scored); the score cache makes re-scoring cheap.

Errors are rows, never fatal: a verdict that failed (a judge backend down, a missing reference) is
stored with ``error`` set and ``score`` empty, and tried again by the next run; an answer whose task
has no scorer is counted in the summary under ``no_scorer`` (name one with ``scorer=``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from router_ml.collect.store import AnswerStore
from router_ml.scoring.base import Example, Score, Scorer, ScoringError
from router_ml.scoring.cache import ScoreCache, score_examples
from router_ml.scoring.registry import scorer_name_for


def _text(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _tests(stored: object) -> str | None:
    """The store's ``tests`` (JSON of a string or of a list of strings) as one block of test code."""
    text = _text(stored)
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, str) else "\n".join(value)


def example_of(row: dict[str, Any]) -> Example:
    """The :class:`Example` of one row of :meth:`AnswerStore.answers`."""
    return Example(
        prompt=str(row["prompt"]),
        answer=str(row["answer"]),
        reference=_text(row.get("reference")),
        tests=_tests(row.get("tests")),
        task=_text(row.get("task")),
    )


class _RowSafe(Scorer):
    """``scorer`` with its name, version and fingerprint, whose batch never raises: when the batch
    does, each example is scored alone and one that raises gets a :class:`Score` with the error."""

    def __init__(self, scorer: Scorer) -> None:
        self.inner = scorer
        self.name, self.version = scorer.name, scorer.version  # type: ignore[misc]

    def get_params(self) -> dict[str, Any]:
        return self.inner.get_params()

    def score(self, examples: Sequence[Example]) -> list[Score]:
        try:
            return self.inner.score(examples)
        except Exception:
            pass
        out = []
        for ex in examples:
            try:
                out.extend(self.inner.score([ex]))
            except Exception as err:  # recorded on the row, never raised
                out.append(self.inner.make(None, error=f"{type(err).__name__}: {err}"))
        return out


def _detail(s: Score) -> str | None:
    if s.extracted is None and s.detail is None:
        return None
    return json.dumps({"extracted": s.extracted, "detail": s.detail}, ensure_ascii=False)


def score_store(
    store: AnswerStore,
    get_scorer: Callable[[str], Scorer],
    *,
    scorer: str | None = None,
    cache: ScoreCache | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every answer of ``store`` not yet scored by its scorer's current version.

    ``get_scorer(name)`` builds (once per name, e.g. :func:`~router_ml.scoring.registry.build_scorer`;
    a judge needs its client) the scorers used; ``scorer`` names one for every answer. Returns a
    summary: answers, how many were scored now / already / failed / had no scorer, and per scorer
    its version, rows, mean score, errors and the judge's cost.
    """
    answers = store.answers()
    answers = answers[answers["ok"] == 1].reset_index(drop=True)
    rows = answers.to_dict("records")
    done = store.scored_keys()
    built: dict[str, _RowSafe] = {}
    todo: dict[str, list[int]] = {}
    no_scorer: Counter[str] = Counter()
    already = 0
    for i, row in enumerate(rows):
        try:
            name = scorer or scorer_name_for(example_of(row))
        except ScoringError:
            no_scorer[str(row.get("task"))] += 1
            continue
        if name not in built:
            built[name] = _RowSafe(get_scorer(name))
        if (row["prompt_id"], row["model"], name, built[name].version) in done:
            already += 1
            continue
        todo.setdefault(name, []).append(i)
    by_scorer: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=sum(map(len, todo.values())), desc="score store", unit="ans", disable=not progress)
    for name, idx in todo.items():
        safe = built[name]
        tally = by_scorer[name] = {"version": safe.version, "rows": 0, "errors": 0, "cost_usd": 0.0}
        values = []
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            got = score_examples(safe, [example_of(rows[i]) for i in part], cache=cache, progress=False)
            store.add_scores(
                [
                    {"prompt_id": rows[i]["prompt_id"], "model": rows[i]["model"], "scorer": s.scorer,
                     "version": s.version, "score": s.value, "detail": _detail(s),
                     "cost_usd": s.cost_usd, "error": s.error}
                    for i, s in zip(part, got, strict=True)
                ]
            )  # fmt: skip
            tally["rows"] += len(part)
            tally["errors"] += sum(not s.ok for s in got)
            tally["cost_usd"] += sum(s.cost_usd for s in got)
            values += [s.value for s in got if s.ok]
            bar.update(len(part))
            bar.set_postfix(scorer=name, errors=sum(t["errors"] for t in by_scorer.values()))
        tally["mean_score"] = sum(values) / len(values) if values else None
    bar.close()
    scored = sum(t["rows"] for t in by_scorer.values())
    return {
        "store": str(store.path),
        "answers": len(rows),
        "scored": scored,
        "already_scored": already,
        "failed": sum(t["errors"] for t in by_scorer.values()),
        "no_scorer": dict(no_scorer),
        "by_scorer": by_scorer,
    }
