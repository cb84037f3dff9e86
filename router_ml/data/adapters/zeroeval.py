"""zeroeval_math_code: 57 models on GSM8K, MATH level 5 and CRUXEval (zero-shot, ZeroEval harness).

prompt = the item's question; score = ``correct`` (0/1, no extracted answer = 0); source_task =
the ZeroEval task (gsm, math-l5, crux); output tokens from ``output_chars`` (NaN when 0).
"""

from __future__ import annotations

import os

import pandas as pd

from router_ml.data.adapters._common import finish_table, resolve_dir, tokens_from_chars

FOLDER = "zeroeval_math_code"


def load_zeroeval(path: str | os.PathLike | None = None, *, costs: bool = True) -> pd.DataFrame:
    """Long table: one row per (item, model) outcome, 117,679 rows."""
    folder = resolve_dir(path, FOLDER)
    items = pd.read_parquet(folder / "items.parquet")[["task", "item_id", "question"]]
    o = pd.read_parquet(folder / "model_outcomes.parquet")
    df = o.merge(items, on=["task", "item_id"], how="inner", validate="many_to_one")
    if len(df) != len(o):
        raise ValueError(f"zeroeval: {len(o) - len(df)} outcomes refer to unknown items")
    chars = df["output_chars"].astype("float64").where(df["output_chars"] > 0)
    out = pd.DataFrame(
        {
            "prompt_id": FOLDER + "/" + df["task"] + "/" + df["item_id"].astype(str),
            "prompt": df["question"],
            "source_task": df["task"],
            "model": df["model"],
            "score": df["correct"].astype("float64"),
            "input_tokens": tokens_from_chars(df["question"].str.len()),
            "output_tokens": tokens_from_chars(chars),
            "cost_usd": float("nan"),
            "latency_s": float("nan"),
        }
    )
    return finish_table(out, FOLDER, costs=costs)
