"""Prompt sets with task labels and no outcomes, for training and testing the task classifier.

- ``wizardlm``: shared ``task_labelled_prompts/wizardlm_testset.jsonl`` (Skill -> task).
- ``mt_bench``: shared ``task_labelled_prompts/mt_bench_questions.jsonl`` (first turn; category -> task).
- ``project``: the repository's ``data/labelled_prompts/*.jsonl``, one ``{"id", "prompt", "task"}``
  object per line, ``task`` one of :data:`TASK_TYPES`.
- ``fresh``: ``data/labelled_prompts_fresh/*.jsonl``, same format: 240 prompts written after the task
  head was tuned, blind to it; a test set only, never trained or tuned on.

Every loader returns columns ``prompt_id, prompt, task, source_task, source``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from router_ml.data.jsonl import iter_jsonl
from router_ml.data.splits import normalize_text
from router_ml.data.taxonomy import TASK_TYPES, map_task
from router_ml.paths import project_data_dir, source_dir

LABELLED_COLUMNS: tuple[str, ...] = ("prompt_id", "prompt", "task", "source_task", "source")
LABELLED_SETS: tuple[str, ...] = ("wizardlm", "mt_bench", "project", "fresh")
SHARED_FOLDER = "task_labelled_prompts"
PROJECT_SOURCE = "router_ml_labelled"
FRESH_SOURCE = "router_ml_fresh"


class LabelledDataError(ValueError):
    """A labelled prompt file breaks its format; the message names file:line."""


def _read_shared(name: str, path: str | os.PathLike | None, file: str) -> pd.DataFrame:
    target = Path(path) if path is not None else source_dir(SHARED_FOLDER) / file
    if target.is_dir():
        target = target / file
    if not target.is_file():
        raise FileNotFoundError(f"labelled set {name!r}: file {str(target)!r} not found")
    return pd.read_json(target, lines=True)


def _wizardlm(path: str | os.PathLike | None) -> pd.DataFrame:
    raw = _read_shared("wizardlm", path, "wizardlm_testset.jsonl")
    return pd.DataFrame(
        {
            "prompt_id": "wizardlm/" + raw["idx"].astype(str),
            "prompt": raw["Instruction"],
            "task": [map_task("wizardlm", s) for s in raw["Skill"]],
            "source_task": raw["Skill"],
            "source": "wizardlm",
        }
    )


def _mt_bench(path: str | os.PathLike | None) -> pd.DataFrame:
    raw = _read_shared("mt_bench", path, "mt_bench_questions.jsonl")
    return pd.DataFrame(
        {
            "prompt_id": "mt_bench/" + raw["question_id"].astype(str),
            "prompt": raw["turns"].str[0],
            "task": [map_task("mt_bench", c) for c in raw["category"]],
            "source_task": raw["category"],
            "source": "mt_bench",
        }
    )


def _project_record(rec: object, where: str) -> dict[str, str]:
    if not isinstance(rec, dict):
        raise LabelledDataError(
            f"{where}: expected a JSON object {{id, prompt, task}}, got {type(rec).__name__}"
        )
    missing = [k for k in ("id", "prompt", "task") if k not in rec]
    if missing:
        raise LabelledDataError(f"{where}: missing field(s) {missing}")
    if not isinstance(rec["id"], str) or not rec["id"].strip():
        raise LabelledDataError(f"{where}: 'id' must be a non-empty string")
    if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
        raise LabelledDataError(f"{where}: 'prompt' must be a non-empty string")
    if rec["task"] not in TASK_TYPES:
        raise LabelledDataError(f"{where}: unknown task {rec['task']!r}; expected one of {list(TASK_TYPES)}")
    return {"id": rec["id"], "prompt": rec["prompt"], "task": rec["task"]}


def _project(path: str | os.PathLike | None, name: str = "project") -> pd.DataFrame:
    default, source = {
        "project": ("labelled_prompts", PROJECT_SOURCE),
        "fresh": ("labelled_prompts_fresh", FRESH_SOURCE),
    }[name]
    folder = Path(path) if path is not None else project_data_dir() / default
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"labelled set {name!r}: no *.jsonl files in {str(folder)!r}")
    rows: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for file in files:
        for where, _, value in iter_jsonl(file, LabelledDataError):
            rec = _project_record(value, where)
            if rec["id"] in seen:
                raise LabelledDataError(f"{where}: duplicate id {rec['id']!r} (first at {seen[rec['id']]})")
            seen[rec["id"]] = where
            rows.append(rec)
    df = pd.DataFrame(rows, columns=["id", "prompt", "task"])
    return pd.DataFrame(
        {
            "prompt_id": f"{name}/" + df["id"],
            "prompt": df["prompt"],
            "task": df["task"],
            "source_task": df["task"],
            "source": source,
        }
    )


def load_labelled(name: str, path: str | os.PathLike | None = None) -> pd.DataFrame:
    """One labelled prompt set: (n_prompts, 5) :data:`LABELLED_COLUMNS`; ``path`` overrides its file."""
    loaders = {
        "wizardlm": _wizardlm,
        "mt_bench": _mt_bench,
        "project": _project,
        "fresh": lambda p: _project(p, "fresh"),
    }
    if name not in loaders:
        raise KeyError(f"unknown labelled set {name!r}; known sets: {list(LABELLED_SETS)}")
    return loaders[name](path).reset_index(drop=True)


def load_benchmark_task_labels(
    sources: Iterable[str] = ("llmrouter",),
    max_per_source_task: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """(prompt, task) pairs from routing sources, for training the task classifier.

    One row per distinct prompt text (:func:`normalize_text`); texts labelled with two tasks are
    dropped. ``max_per_source_task`` caps each (source, source_task) with a seeded sample so large
    benchmarks do not drown the rest. Columns: :data:`LABELLED_COLUMNS`.
    """
    from router_ml.data.adapters import load_source

    frames = []
    for name in sources:
        table = load_source(name, costs=False)
        frames.append(table.drop_duplicates("prompt_id")[list(LABELLED_COLUMNS)])
    df = pd.concat(frames, ignore_index=True)
    key = df["prompt"].map(normalize_text)
    single_task = df.groupby(key)["task"].transform("nunique") == 1
    df = df[single_task & ~key.duplicated()]
    if max_per_source_task is not None:
        shuffled = df.sample(frac=1.0, random_state=seed)
        df = shuffled.groupby(["source", "source_task"], sort=False).head(max_per_source_task)
    return df.sort_values("prompt_id", kind="stable").reset_index(drop=True)
