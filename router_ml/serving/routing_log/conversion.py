"""The routing log read back (rotated files included, torn lines skipped) and turned into a
canonical routing table: new training data."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from router_ml.data.schema import validate_table
from router_ml.data.taxonomy import TASK_TYPES
from router_ml.serving.routing_log.writer import FIELDS, NUMERIC, RoutingLogError


def log_files(path: str | os.PathLike) -> list[Path]:
    """``path`` and its rotated backups, oldest first."""
    path = Path(path)
    backups = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    return sorted(backups, key=lambda p: -int(p.suffix[1:])) + ([path] if path.exists() else [])


def read_routing_log(path: str | os.PathLike, include_rotated: bool = True) -> pd.DataFrame:
    """The log as a DataFrame, one row per line, oldest first (columns :data:`FIELDS`, then any
    others). A torn last line (a crash mid-write) is skipped; another bad line is skipped with a
    warning naming it."""
    files = log_files(path) if include_rotated else [Path(path)]
    if not any(f.exists() for f in files):
        raise FileNotFoundError(f"routing log {str(path)!r} not found")
    records = []
    for f in files:
        data = f.read_bytes()
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                if i < len(lines) - 1:  # a torn last line has no newline: skipped silently
                    warnings.warn(f"{f}:{i + 1}: unreadable routing-log line skipped ({err})", stacklevel=2)
                continue
            records.append(rec)
    df = pd.DataFrame.from_records(records)
    df = df.reindex(columns=FIELDS + [c for c in df.columns if c not in FIELDS])
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def to_routing_table(
    log_df: pd.DataFrame,
    scores: Mapping[str, float] | pd.Series | pd.DataFrame,
    prompts: Mapping[str, str] | None = None,
    source: str = "routing_log",
    known_models: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Logged requests plus later outcome scores -> a canonical routing table (validated).

    ``scores``: ``request_id -> score in [0, 1]`` (a mapping, a Series indexed by request id, or a
    frame with ``request_id`` and ``score``). Kept: requests with outcome ``"ok"``, a score, a task
    of the taxonomy and prompt text (logged in full, or found in ``prompts``: sha256 -> text).
    One row per (prompt, model that answered): repeated requests are averaged. ``prompt_id`` is
    ``"log-" + sha256[:16]``.
    """
    if isinstance(scores, pd.DataFrame):
        scores = scores.set_index("request_id")["score"]
    scores = pd.Series(scores, dtype="float64")
    df = log_df.drop_duplicates("request_id", keep="last")
    df = df[(df["outcome"] == "ok") & df["request_id"].isin(scores.index) & df["served_model"].notna()].copy()
    text = df["prompt"]
    if prompts is not None:
        text = text.fillna(df["prompt_sha256"].map(prompts))
    df["prompt"] = text
    usable = df["prompt"].notna() & df["prompt_sha256"].notna() & df["task"].isin(TASK_TYPES)
    if (~usable).any():
        warnings.warn(
            f"{int((~usable).sum())} scored request(s) skipped: no prompt text or no known task", stacklevel=2
        )
    df = df[usable]
    if df.empty:
        raise RoutingLogError("no logged request has outcome 'ok', a score, prompt text and a known task")
    df["score"] = scores.reindex(df["request_id"]).to_numpy()
    df["prompt_id"] = "log-" + df["prompt_sha256"].str[:16]
    first = df.groupby("prompt_id")[["prompt", "task"]].agg(lambda s: s.mode().iloc[0])
    num = ["score", "input_tokens", "output_tokens", "cost_usd", "latency_s"]
    out = df.groupby(["prompt_id", "served_model"], as_index=False)[num].mean()
    out = out.rename(columns={"served_model": "model"}).join(first, on="prompt_id")
    out["source_task"], out["source"] = out["task"], source
    return validate_table(out, known_models=known_models, name=f"routing table from {source}")
