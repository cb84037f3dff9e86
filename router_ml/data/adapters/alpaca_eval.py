"""alpaca_eval_annotations: 55 models x 805 open-ended instructions, judged against GPT-4-Turbo.

score = preference - 1, in [0, 1]: the GPT-4-Turbo judge's logprob-weighted probability that this
model's answer beats the baseline (gpt4_1106_preview) answer; the mean over prompts is the
AlpacaEval 2.0 win rate (not length-controlled). source_task = the instruction's origin subset
(helpful_base, koala, oasst, selfinstruct, vicuna); output tokens from ``output_chars``.
"""

from __future__ import annotations

import os

import pandas as pd

from router_ml.data.adapters._common import finish_table, resolve_dir, tokens_from_chars

FOLDER = "alpaca_eval_annotations"


def load_alpaca_eval(path: str | os.PathLike | None = None, *, costs: bool = True) -> pd.DataFrame:
    """Long table: one row per (instruction, model) judgement, 44,265 rows."""
    folder = resolve_dir(path, FOLDER)
    ins = pd.read_parquet(folder / "instructions.parquet")
    pref = pd.read_parquet(folder / "model_preferences.parquet")
    df = pref.merge(ins, on="instruction_id", how="inner", validate="many_to_one")
    if len(df) != len(pref):
        raise ValueError(f"alpaca_eval: {len(pref) - len(df)} judgements refer to unknown instructions")
    pref_val = df["preference"].astype("float64")
    if ((pref_val < 1 - 1e-9) | (pref_val > 2 + 1e-9)).any():
        raise ValueError("alpaca_eval: preference outside [1, 2]")
    chars = df["output_chars"].astype("float64").where(df["output_chars"] > 0)
    out = pd.DataFrame(
        {
            "prompt_id": FOLDER + "/" + df["instruction_id"].astype(str),
            "prompt": df["instruction"],
            "source_task": df["dataset"],
            "model": df["model"],
            "score": (pref_val - 1.0).clip(0.0, 1.0),
            "input_tokens": tokens_from_chars(df["instruction"].str.len()),
            "output_tokens": tokens_from_chars(chars),
            "cost_usd": float("nan"),
            "latency_s": float("nan"),
        }
    )
    return finish_table(out, FOLDER, costs=costs)
