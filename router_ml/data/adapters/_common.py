"""Helpers shared by the source adapters: path resolution, task mapping, costs, validation."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from router_ml.data.prices import attach_costs, model_prices, tokens_from_chars
from router_ml.data.schema import validate_table
from router_ml.data.taxonomy import map_task

__all__ = ["finish_table", "resolve_dir", "tokens_from_chars"]


def resolve_dir(path: str | os.PathLike | None, folder: str) -> Path:
    """``path`` as a folder, or when ``path`` is None the data set folder ``folder``: in the data
    dir, else fetched into the cache on first use (:func:`router_ml.data.fetch.locate`)."""
    if path is None:
        from router_ml.data.fetch import locate  # imported late: the HTTP client and the builders

        return locate(folder)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{folder}: data folder {str(path)!r} not found")
    return path


def finish_table(
    df: pd.DataFrame,
    source: str,
    *,
    costs: bool = True,
    prices: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Set ``source`` and ``task`` (mapped from ``source_task``), fill costs, validate.

    ``costs``: fill input/output tokens and cost_usd where NaN (:func:`attach_costs`);
    ``prices``: a :func:`model_prices` frame (default: looked up for the table's models).
    """
    df = df.copy()
    df["source"] = source
    mapping = {name: map_task(source, name) for name in df["source_task"].unique()}
    df["task"] = df["source_task"].map(mapping)
    if costs:
        if prices is None:
            prices = model_prices(sorted(df["model"].unique()))
        df = attach_costs(df, prices)
    return validate_table(df, name=source)
