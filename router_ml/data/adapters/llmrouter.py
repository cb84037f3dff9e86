"""llmrouter_ulab: JSONL of ``{prompt, task_name, scores: {model: score}}`` (+ optional prompt_id).

Scores are already in [0, 1]. Costs: list prices per 1M tokens from ``llm_candidates.json`` (next
to the JSONL; for the shipped parquet, the prices in its metadata; else the shared tables via
:mod:`router_ml.data.prices`) x estimated tokens (prompt chars / 4 in, the task's output-token
prior out).

The same records may come as a parquet file with columns ``prompt``, ``task_name``, optional
``prompt_id`` and one ``score/<model>`` column per model (NaN = no score): the compact copy shipped
in :mod:`router_ml.data.default`, read when neither ``$ROUTER_ML_DATA_DIR/llmrouter_ulab`` nor a
fetched build in the cache exists (:func:`default_file`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from router_ml.data.adapters._common import finish_table
from router_ml.data.jsonl import iter_jsonl
from router_ml.data.prices import model_prices, shipped_llmrouter_prices
from router_ml.paths import DATA_DIR_ENV, SHIPPED_LLMROUTER_FILE, data_dir

FOLDER = "llmrouter_ulab"
#: the compact copy shipped in the package (:mod:`router_ml.data.default`): one row per prompt,
#: one ``score/<model>`` column per model
DEFAULT_FILE = SHIPPED_LLMROUTER_FILE
SCORE_PREFIX = "score/"
log = logging.getLogger(__name__)


class MalformedRecordError(ValueError):
    """A JSONL line that is not a valid routing record; the message names file:line."""


def _check_record(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise MalformedRecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "task_name", "scores"):
        if key not in rec:
            raise MalformedRecordError(f"{where}: missing field {key!r}")
    if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
        raise MalformedRecordError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(rec["task_name"], str) or not rec["task_name"]:
        raise MalformedRecordError(f"{where}: 'task_name' must be a non-empty string")
    scores = rec["scores"]
    if not isinstance(scores, dict) or not scores:
        raise MalformedRecordError(f"{where}: 'scores' must be a non-empty object {{model: score}}")
    for model, s in scores.items():
        ok = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 <= s <= 1
        if not ok:
            raise MalformedRecordError(
                f"{where}: score for model {model!r} must be a number in [0, 1], got {s!r}"
            )
    if "prompt_id" in rec and not isinstance(rec["prompt_id"], (str, int)):
        raise MalformedRecordError(f"{where}: 'prompt_id' must be a string or integer")


def read_jsonl(file: Path) -> list[dict[str, Any]]:
    """Parse and check every line of ``file`` (blank lines skipped); errors name file:line."""
    records = []
    for where, lineno, rec in iter_jsonl(file, MalformedRecordError):
        _check_record(rec, where)
        rec["_line"] = lineno
        records.append(rec)
    if not records:
        raise MalformedRecordError(f"{file}: no records")
    return records


def read_parquet(file: Path) -> list[dict[str, Any]]:
    """The records of an llmrouter parquet (see the module docstring), each checked like a JSONL
    line; errors name ``file: row N`` (1-based)."""
    try:
        frame = pd.read_parquet(file)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise MalformedRecordError(f"{file}: not a readable parquet file ({err})") from None
    score_cols = [c for c in frame.columns if str(c).startswith(SCORE_PREFIX)]
    missing = [c for c in ("prompt", "task_name") if c not in frame.columns]
    if missing or not score_cols:
        raise MalformedRecordError(
            f"{file}: missing column(s) {missing + ([] if score_cols else [SCORE_PREFIX + '<model>'])}; "
            f"an llmrouter parquet needs prompt, task_name and one {SCORE_PREFIX}<model> column per model"
        )
    models = [c[len(SCORE_PREFIX) :] for c in score_cols]
    scores = frame[score_cols].to_numpy(dtype="float64")
    ids = frame["prompt_id"].tolist() if "prompt_id" in frame.columns else None
    records = []
    for i, (prompt, task) in enumerate(zip(frame["prompt"], frame["task_name"], strict=True)):
        row = scores[i]
        rec: dict[str, Any] = {
            "prompt": prompt,
            "task_name": task,
            "scores": {m: float(v) for m, v in zip(models, row, strict=True) if not math.isnan(v)},
        }
        if ids is not None:
            rec["prompt_id"] = ids[i]
        _check_record(rec, f"{file}: row {i + 1}")
        rec["_line"] = i + 1
        records.append(rec)
    if not records:
        raise MalformedRecordError(f"{file}: no records")
    return records


def default_file() -> Path:
    """Where ``llmrouter`` is read from, the first that exists: ``$ROUTER_ML_DATA_DIR/llmrouter_ulab``,
    the build ``router-ml data fetch llmrouter`` left in the cache, else the copy shipped in the
    package (the same table; :mod:`router_ml.data.default`). Never downloads: the shipped copy
    makes that unnecessary."""
    from router_ml.data.fetch import built_dir, get_source, is_built  # imported late: httpx and co

    if (data_dir() / FOLDER).is_dir():
        return data_dir() / FOLDER / "train.jsonl"
    src = get_source("llmrouter")
    if is_built(built_dir(src), src):
        return built_dir(src) / "train.jsonl"
    log.info(
        "llmrouter: no %r folder in the data folder %r (set %s to change it) nor in the cache; "
        "reading the copy shipped in the package (%s)",
        FOLDER,
        str(data_dir()),
        DATA_DIR_ENV,
        DEFAULT_FILE.name,
    )
    return DEFAULT_FILE


def _candidate_prices(file: Path, models: list[str]) -> pd.DataFrame:
    """Prices for ``models``: the ``llm_candidates.json`` beside ``file`` if any, the prices in the
    shipped table's metadata for that table, else the shared price tables."""
    cand = file.parent / "llm_candidates.json"
    if cand.is_file():
        table, label = json.loads(cand.read_text()), cand.name
    elif file == DEFAULT_FILE:
        table, label = shipped_llmrouter_prices(), "shipped prices"
    else:
        return model_prices(models)
    rows = [
        (m, float(table[m]["input_price"]), float(table[m]["output_price"]), math.nan, f"{label}: {m}")
        for m in models
        if m in table
    ]
    found = pd.DataFrame(
        rows, columns=["model", "input_per_mtok", "output_per_mtok", "context_window", "price_source"]
    )
    rest = [m for m in models if m not in table]
    return pd.concat([found, model_prices(rest)], ignore_index=True) if rest else found


def load_llmrouter(
    path: str | os.PathLike | None = None, *, costs: bool = True, source: str = FOLDER
) -> pd.DataFrame:
    """Long routing table from an llmrouter-format JSONL or parquet file (or a folder holding
    train.jsonl); ``path=None`` reads :func:`default_file`.

    Returns one row per (prompt, model): n_prompts x n_models rows. prompt_id is
    ``"<source>/<prompt_id>"`` (or ``"<source>/<file stem>-<line or row>"`` when the record has none).
    """
    file = default_file() if path is None else Path(path).expanduser()
    if file.is_dir():
        file = file / "train.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"llmrouter: data file {str(file)!r} not found")
    records = read_parquet(file) if file.suffix == ".parquet" else read_jsonl(file)
    ids = [
        f"{source}/{rec['prompt_id']}" if "prompt_id" in rec else f"{source}/{file.stem}-{rec['_line']}"
        for rec in records
    ]
    prompts = pd.DataFrame(
        {
            "prompt_id": ids,
            "prompt": [r["prompt"] for r in records],
            "source_task": [r["task_name"] for r in records],
            "scores": [r["scores"] for r in records],
        }
    )
    dup = prompts["prompt_id"].duplicated()
    if dup.any():
        raise MalformedRecordError(
            f"{file}: duplicate prompt_id(s) {prompts.loc[dup, 'prompt_id'].head(5).tolist()}"
        )
    scores = pd.DataFrame(prompts.pop("scores").tolist(), index=prompts.index)
    scores.columns.name = "model"
    long = scores.stack().dropna().rename("score").reset_index(level="model")
    df = prompts.join(long, how="inner").reset_index(drop=True)
    for col in ("input_tokens", "output_tokens", "cost_usd", "latency_s"):
        df[col] = float("nan")
    prices = _candidate_prices(file, sorted(df["model"].unique())) if costs else None
    return finish_table(df, source, costs=costs, prices=prices)
