"""mmlu_pro_model_outputs: 29 models x 12,008 MMLU-Pro questions (5-shot CoT outcomes).

prompt = question + the lettered options (``A. ...`` up to ``J. ...``); score = ``correct``
(0/1; a missing extracted answer counts as wrong); source_task = category; output tokens from
``generated_chars`` (NaN where the source kept no text: 0 chars for 4 API models).
"""

from __future__ import annotations

import json
import os

import pandas as pd

from router_ml.data.adapters._common import finish_table, resolve_dir, tokens_from_chars
from router_ml.data.prompt_text import format_question

FOLDER = "mmlu_pro_model_outputs"


def load_mmlu_pro(path: str | os.PathLike | None = None, *, costs: bool = True) -> pd.DataFrame:
    """Long table: one row per (question, model) outcome, 346,520 rows."""
    folder = resolve_dir(path, FOLDER)
    q = pd.read_parquet(folder / "questions.parquet")
    o = pd.read_parquet(folder / "model_outcomes.parquet")
    prompts = pd.DataFrame(
        {
            "question_id": q["question_id"].to_numpy(),
            "prompt": [
                format_question(t, json.loads(opts))
                for t, opts in zip(q["question"], q["options"], strict=True)
            ],
            "source_task": q["category"].to_numpy(),
        }
    )
    df = o.merge(prompts, on="question_id", how="inner", validate="many_to_one")
    if len(df) != len(o):
        raise ValueError(f"mmlu_pro: {len(o) - len(df)} outcomes refer to unknown question ids")
    chars = df["generated_chars"].astype("float64").where(df["generated_chars"] > 0)
    out = pd.DataFrame(
        {
            "prompt_id": FOLDER + "/" + df["question_id"].astype(str),
            "prompt": df["prompt"],
            "source_task": df["source_task"],
            "model": df["model"],
            "score": df["correct"].astype("float64"),
            "input_tokens": tokens_from_chars(df["prompt"].str.len()),
            "output_tokens": tokens_from_chars(chars),
            "cost_usd": float("nan"),
            "latency_s": float("nan"),
        }
    )
    return finish_table(out, FOLDER, costs=costs)
