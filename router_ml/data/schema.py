"""The canonical routing table: one row per (prompt, model) outcome, long format.

Columns (required): ``prompt_id`` (str), ``prompt`` (str, non-empty), ``task`` (one of
:data:`router_ml.data.taxonomy.TASK_TYPES`), ``source_task`` (the source's own task name),
``model`` (str), ``score`` (float in [0, 1], higher is better).
Columns (optional, NaN where unknown): ``input_tokens``, ``output_tokens``, ``cost_usd``,
``latency_s``; ``source`` (data-set name).

A (prompt_id, model) pair occurs at most once. Every prompt_id has one prompt text and one task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from router_ml.data.taxonomy import TASK_TYPES

REQUIRED_COLUMNS: tuple[str, ...] = ("prompt_id", "prompt", "task", "source_task", "model", "score")
OPTIONAL_COLUMNS: tuple[str, ...] = ("input_tokens", "output_tokens", "cost_usd", "latency_s", "source")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


class RoutingTableError(ValueError):
    """A routing table breaks the schema; the message names the problem."""


def validate_table(
    df: pd.DataFrame, known_models: Iterable[str] | None = None, name: str = "routing table"
) -> pd.DataFrame:
    """Check ``df`` against the schema and return it with canonical dtypes and column order.

    Raises :class:`RoutingTableError` naming the first problem found (missing column, empty
    prompt, score out of range, duplicate prompt x model, unknown model or task).
    """
    if not isinstance(df, pd.DataFrame):
        raise RoutingTableError(f"{name}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise RoutingTableError(f"{name}: missing required column(s) {missing}")
    if df.empty:
        raise RoutingTableError(f"{name}: no rows")
    out = df.copy()
    for col in ("prompt_id", "prompt", "task", "source_task", "model"):
        if out[col].isna().any():
            raise RoutingTableError(f"{name}: column {col!r} has {int(out[col].isna().sum())} missing values")
        out[col] = out[col].astype(str)
    empty = out["prompt"].str.strip() == ""
    if empty.any():
        ids = out.loc[empty, "prompt_id"].unique()[:5].tolist()
        raise RoutingTableError(f"{name}: empty prompt for prompt_id(s) {ids}")
    score = pd.to_numeric(out["score"], errors="coerce")
    if score.isna().any():
        bad = out.loc[score.isna(), ["prompt_id", "model"]].head(3).values.tolist()
        raise RoutingTableError(f"{name}: score missing or not a number for (prompt_id, model) {bad}")
    outside = (score < 0) | (score > 1)
    if outside.any():
        row = out.loc[outside].iloc[0]
        raise RoutingTableError(
            f"{name}: score out of range [0, 1]: {float(score[outside].iloc[0])!r} "
            f"for prompt_id {row['prompt_id']!r}, model {row['model']!r}"
        )
    out["score"] = score.astype("float64")
    unknown_tasks = sorted(set(out["task"]) - set(TASK_TYPES))
    if unknown_tasks:
        raise RoutingTableError(
            f"{name}: unknown task type(s) {unknown_tasks}; expected one of {list(TASK_TYPES)}"
        )
    if known_models is not None:
        known = set(known_models)
        unknown = sorted(set(out["model"]) - known)
        if unknown:
            raise RoutingTableError(f"{name}: unknown model(s) {unknown}; known models are {sorted(known)}")
    dup = out.duplicated(["prompt_id", "model"])
    if dup.any():
        row = out.loc[dup].iloc[0]
        raise RoutingTableError(
            f"{name}: duplicate prompt x model: prompt_id {row['prompt_id']!r}, model {row['model']!r} "
            f"({int(dup.sum())} duplicate rows)"
        )
    per_prompt = out.groupby("prompt_id")[["prompt", "task"]].nunique()
    conflicting = per_prompt[(per_prompt > 1).any(axis=1)]
    if len(conflicting):
        raise RoutingTableError(
            f"{name}: prompt_id(s) {conflicting.index[:5].tolist()} carry more than one prompt text or task"
        )
    for col in ("input_tokens", "output_tokens", "cost_usd", "latency_s"):
        if col in out.columns:
            vals = pd.to_numeric(out[col], errors="coerce").astype("float64")
            if (vals < 0).any():
                raise RoutingTableError(f"{name}: negative values in column {col!r}")
            out[col] = vals
        else:
            out[col] = np.nan
    if "source" not in out.columns:
        out["source"] = ""
    out["source"] = out["source"].fillna("").astype(str)
    extra = [c for c in out.columns if c not in COLUMNS]
    return out[list(COLUMNS) + extra].reset_index(drop=True)


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write a routing table as parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    validate_table(df).to_parquet(path, index=False)
    return path


def read_table(path: str | Path, known_models: Iterable[str] | None = None) -> pd.DataFrame:
    """Read a parquet routing table and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"routing table {str(path)!r} not found")
    return validate_table(pd.read_parquet(path), known_models=known_models, name=str(path))


def to_wide(df: pd.DataFrame, models: list[str] | None = None) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Pivot a long table into prompts and a score matrix.

    Returns ``(prompts, scores, models)``: ``prompts`` has one row per prompt_id (columns
    prompt_id, prompt, task, source_task), ``scores`` is float array (n_prompts, n_models) with NaN
    where a model has no outcome, and ``models`` gives the column order.
    """
    models = list(models) if models is not None else sorted(df["model"].unique())
    prompts = (
        df.drop_duplicates("prompt_id")[["prompt_id", "prompt", "task", "source_task"]]
        .sort_values("prompt_id", kind="stable")
        .reset_index(drop=True)
    )
    wide = df.pivot(index="prompt_id", columns="model", values="score").reindex(
        index=prompts["prompt_id"], columns=models
    )
    return prompts, wide.to_numpy(dtype="float64"), models


def wide_column(df: pd.DataFrame, prompts: pd.DataFrame, models: list[str], column: str) -> np.ndarray:
    """Any numeric column of the long table as an (n_prompts, n_models) matrix aligned to ``to_wide``."""
    wide = df.pivot(index="prompt_id", columns="model", values=column).reindex(
        index=prompts["prompt_id"], columns=models
    )
    return wide.to_numpy(dtype="float64")


def table_hash(df: pd.DataFrame) -> str:
    """A stable sha256 of a table's prompt ids, models and scores (the checkpoint's training-data hash)."""
    key = df.sort_values(["prompt_id", "model"])[["prompt_id", "model", "score"]]
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(key, index=False).values.tobytes())
    return h.hexdigest()
