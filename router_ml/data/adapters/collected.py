"""A collection store as a routing data set: ``data=collected data.path=answers.sqlite``.

Reads the store's SQLite file directly (:mod:`router_ml.data.store_file`; the data layer sits below
the collection harness) and returns the canonical long table: one row per (prompt, model) with a
stored answer and a verdict. Measured figures come along: ``input_tokens`` / ``output_tokens``
(the backend's usage), ``cost_usd`` (catalog prices at collection time), ``latency_s`` and, as an
extra column, ``ttft_s``; ``scorer`` and ``scorer_version`` record which verdict each score is.

**Which verdict.** ``scorer`` (one name for every row) or, by default, the scorer the registry picks
for each row's task (:func:`router_ml.scoring.registry.scorer_name_for`); of that scorer, version
``scorer_version`` or by default its latest (the version that scored in the store last). Rows with
no such verdict (not scored yet, scoring failed, a task with no automatic scorer) are dropped and
counted in a warning.

**Task type.** The prompt's own ``task`` when it is a task type (``reason``, ``code``, ...), else its
mapping in :data:`router_ml.data.taxonomy.SOURCE_TASK_MAP` ``["collected"]`` (benchmark and scorer
names: ``gsm8k`` -> reason, ``mmlu_*`` -> qa, ``mbpp`` -> code, ...), else ``default_task``; with
none of these it is an error that lists the unmapped names. Tasks are not predicted here: the task
head sits above the data layer (give the task in the prompt file, or ``default_task``).
"""

from __future__ import annotations

import logging
import os

import pandas as pd

from router_ml.data.schema import validate_table
from router_ml.data.store_file import StoreFileError, open_store, read_answers, read_scores
from router_ml.data.taxonomy import TASK_TYPES, UnknownTaskError, map_task
from router_ml.scoring.base import Example, ScoringError
from router_ml.scoring.registry import scorer_name_for

log = logging.getLogger(__name__)
SOURCE = "collected"


def _registry_scorer(task: object, tests: object) -> str | None:
    ex = Example(
        "", "", tests=None if pd.isna(tests) else str(tests), task=None if pd.isna(task) else str(task)
    )
    try:
        return scorer_name_for(ex)
    except ScoringError:
        return None


def _task_type(name: str, default_task: str | None) -> str | None:
    try:
        return map_task(SOURCE, name.strip().lower())
    except UnknownTaskError:
        return default_task


def load_collected(
    path: str | os.PathLike | None = None,
    scorer: str | None = None,
    scorer_version: str | None = None,
    default_task: str | None = None,
) -> pd.DataFrame:
    """The long routing table of the collection store at ``path`` (see the module docstring)."""
    if path is None:
        raise StoreFileError("data=collected needs the store: data.path=PATH/TO/answers.sqlite")
    if scorer_version is not None and scorer is None:
        raise ValueError("collected store: scorer_version needs scorer (the name it is a version of)")
    if default_task is not None and default_task not in TASK_TYPES:
        raise ValueError(f"collected store: default_task {default_task!r} is not one of {list(TASK_TYPES)}")
    db = open_store(path)
    try:
        answers, scores = read_answers(db), read_scores(db)
    finally:
        db.close()
    answers = answers[answers["ok"] == 1]
    if answers.empty:
        raise StoreFileError(f"store {str(path)!r} holds no answers: collect first (router-ml collect ...)")
    scores = scores[scores["error"].isna() & scores["score"].notna()]
    if scores.empty:
        raise StoreFileError(f"store {str(path)!r} has no scored answers: run router-ml score --store {path}")
    if scorer is not None:
        answers = answers.assign(scorer=scorer)
    else:
        names = {
            (t, s): _registry_scorer(t, s)
            for t, s in answers[["task", "tests"]].drop_duplicates().itertuples(index=False)
        }
        answers = answers.assign(
            scorer=[names[(t, s)] for t, s in zip(answers["task"], answers["tests"], strict=True)]
        )
    if scorer_version is not None:
        versions = {scorer: str(scorer_version)}
    else:  # per scorer, the version that scored in the store last
        last = scores.sort_values("version_scored_at").groupby("scorer")["version"].last()
        versions = last.to_dict()
    answers = answers.assign(scorer_version=answers["scorer"].map(versions))
    keep = scores[["prompt_id", "model", "scorer", "version", "score"]].rename(
        columns={"version": "scorer_version"}
    )
    table = answers.merge(keep, on=["prompt_id", "model", "scorer", "scorer_version"], how="inner")
    dropped = len(answers) - len(table)
    if dropped:
        log.warning(
            "store %s: %d of %d answers dropped without a verdict of %s",
            path, dropped, len(answers), f"{scorer}@{scorer_version or 'latest'}" if scorer else
            "the scorer of their task (latest version)",
        )  # fmt: skip
    if table.empty:
        raise StoreFileError(
            f"store {str(path)!r}: no answer has a verdict of "
            f"{scorer or 'the scorer of its task'} (scored: {sorted(set(scores['scorer']))}); "
            "name one with data.options.scorer=NAME"
        )
    source_task = table["task"].fillna("").astype(str)
    mapping = {name: _task_type(name, default_task) for name in source_task.unique()}
    unmapped = sorted(n or "(no task)" for n, t in mapping.items() if t is None)
    if unmapped:
        raise UnknownTaskError(
            f"store {str(path)!r}: prompt task(s) {unmapped} map onto no task type; give each prompt a task "
            f"({list(TASK_TYPES)} or a benchmark name), or set data.options.default_task"
        )
    out = pd.DataFrame(
        {
            "prompt_id": table["prompt_id"].astype(str),
            "prompt": table["prompt"],
            "task": source_task.map(mapping),
            "source_task": source_task.where(source_task != "", "none"),
            "model": table["model"],
            "score": table["score"].astype("float64"),
            "input_tokens": table["input_tokens"],
            "output_tokens": table["output_tokens"],
            "cost_usd": table["cost_usd"],
            "latency_s": table["latency_s"],
            "source": SOURCE,
            "ttft_s": pd.to_numeric(table["ttft_s"], errors="coerce").astype("float64"),
            "scorer": table["scorer"],
            "scorer_version": table["scorer_version"],
        }
    )
    return validate_table(out, name=f"store {str(path)!r}")
