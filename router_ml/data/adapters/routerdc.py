"""routerdc_7models: RouterDC's 7 open 7-8B models on 10 benchmarks (16 JSON files).

Each file is a list of ``{"question", "scores": {model: float}}``. source_task = file stem without
its ``_train``/``_test``/``-train``/``-test`` suffix; ``split`` = train / test from the suffix, or
``ood`` for the four out-of-distribution files (MATH_prealgebra, mbpp, ceval, javascript).
MCQ scores are continuous harness likelihood scores in [0, 1], kept as soft labels.
"""

from __future__ import annotations

import json
import os
import re

import pandas as pd

from router_ml.data.adapters._common import finish_table, resolve_dir, tokens_from_chars

FOLDER = "routerdc_7models"
OOD_FILES: tuple[str, ...] = ("MATH_prealgebra", "mbpp", "ceval", "javascript")
CHINESE_TASKS: tuple[str, ...] = ("cmmlu", "ceval")
_SUFFIX = re.compile(r"[_-](train|test)$")


def _split_of(stem: str) -> tuple[str, str]:
    """(source_task, split) of a file stem."""
    m = _SUFFIX.search(stem)
    if m:
        return stem[: m.start()], m.group(1)
    if stem in OOD_FILES:
        return stem, "ood"
    raise ValueError(
        f"routerdc: file {stem!r}.json is neither train/test nor a known OOD file {list(OOD_FILES)}"
    )


def load_routerdc(
    path: str | os.PathLike | None = None, *, include_chinese: bool = False, costs: bool = True
) -> pd.DataFrame:
    """Long table, 7 models per prompt; extra column ``split`` (train / test / ood).

    ``include_chinese=False`` leaves out cmmlu and ceval (English-only project default).
    """
    folder = resolve_dir(path, FOLDER)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"routerdc: no *.json files under {str(folder)!r}")
    frames = []
    for file in files:
        task, split = _split_of(file.stem)
        if task in CHINESE_TASKS and not include_chinese:
            continue
        records = json.loads(file.read_text(encoding="utf-8"))
        base = pd.DataFrame(
            {
                "prompt_id": [f"{FOLDER}/{file.stem}/{i}" for i in range(len(records))],
                "prompt": [r["question"] for r in records],
            }
        ).assign(source_task=task, split=split)
        scores = pd.DataFrame([r["scores"] for r in records])
        scores.columns.name = "model"
        long = scores.stack().dropna().rename("score").reset_index(level="model")
        frames.append(base.join(long, how="inner"))
    df = pd.concat(frames, ignore_index=True)
    df["input_tokens"] = tokens_from_chars(df["prompt"].str.len())
    for col in ("output_tokens", "cost_usd", "latency_s"):
        df[col] = float("nan")
    return finish_table(df, FOLDER, costs=costs)
