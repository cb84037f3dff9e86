"""routerbench_subset_routerdc: RouterBench 0-shot slice (ARC-Challenge, MBPP, Winogrande), 11 models.

The only source with MEASURED per-call cost: ``<model>|total_cost`` goes to ``cost_usd`` as is.
Prompts are Python-list strings (``ast.literal_eval``, elements joined by a blank line); empty
score cells drop that (prompt, model) row; ``split`` (train/test) comes from the file name.
"""

from __future__ import annotations

import os
import re

import pandas as pd

from router_ml.data.adapters._common import finish_table, resolve_dir, tokens_from_chars
from router_ml.data.prompt_text import join_list_string

FOLDER = "routerbench_subset_routerdc"
FILES: tuple[str, ...] = (
    "arc_challenge_train",
    "arc_challenge_test",
    "mbpp_train",
    "mbpp_test",
    "winograde_train",
    "winograde_test",
)
MODELS: tuple[str, ...] = (
    "WizardLM/WizardLM-13B-V1.2",
    "claude-instant-v1",
    "claude-v1",
    "claude-v2",
    "gpt-3.5-turbo-1106",
    "gpt-4-1106-preview",
    "meta/code-llama-instruct-34b-chat",
    "meta/llama-2-70b-chat",
    "mistralai/mistral-7b-chat",
    "mistralai/mixtral-8x7b-chat",
    "zero-one-ai/Yi-34B-Chat",
)


def _read_file(folder: os.PathLike, stem: str) -> pd.DataFrame:
    raw = pd.read_csv(f"{folder}/{stem}.csv")
    missing = [m for m in MODELS if m not in raw.columns or f"{m}|total_cost" not in raw.columns]
    if missing:
        raise ValueError(f"routerbench: {stem}.csv lacks score/cost columns for {missing}")
    # The unnamed first column is the row index of the full RouterBench frame: unique across files
    # (sample_id is not), so it keeps ids stable if rows are ever removed.
    row_key = raw.iloc[:, 0].astype("int64").astype(str) if raw.columns[0].startswith("Unnamed") else None
    base = pd.DataFrame(
        {
            "prompt_id": f"{FOLDER}/{stem}/" + (row_key if row_key is not None else raw.index.astype(str)),
            "prompt": raw["prompt"].map(join_list_string),
            "source_task": raw["eval_name"].astype(str),
            "sample_id": raw["sample_id"].astype(str),
            "split": re.sub(r"^.*_", "", stem),
        }
    )
    parts = []
    for m in MODELS:
        resp = raw.get(f"{m}|model_response")
        out_chars = (
            resp.map(join_list_string).str.len().where(resp.notna()) if resp is not None else float("nan")
        )
        parts.append(
            base.assign(
                model=m,
                score=pd.to_numeric(raw[m], errors="coerce"),
                cost_usd=pd.to_numeric(raw[f"{m}|total_cost"], errors="coerce"),
                output_tokens=tokens_from_chars(out_chars),
            )
        )
    return pd.concat(parts, ignore_index=True)


def load_routerbench(path: str | os.PathLike | None = None, *, costs: bool = True) -> pd.DataFrame:
    """Long table of the 6 CSVs: (3,162 prompts x 11 models) minus 154 empty score cells.

    Extra columns: ``split`` (train/test, from the file name) and ``sample_id`` (RouterBench's
    own id, duplicated in places). ``cost_usd`` is measured; tokens are estimated (chars / 4).
    """
    folder = resolve_dir(path, FOLDER)
    df = pd.concat([_read_file(folder, stem) for stem in FILES], ignore_index=True)
    df = df[df["score"].notna()].reset_index(drop=True)
    df["input_tokens"] = tokens_from_chars(df["prompt"].str.len())
    df["latency_s"] = float("nan")
    return finish_table(df, FOLDER, costs=costs)
