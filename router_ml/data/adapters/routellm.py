"""routellm_gpt4_mixtral: RouteLLM's GPT-4-1106-preview vs Mixtral-8x7B eval data.

- MMLU: 57 ``mmlu/mmlu_<subject>.csv`` (True/False per model) -> source_task ``mmlu_<subject>``.
- GSM8K: ``gsm8k/gsm8k_responses.csv`` -> ``gsm8k``; output tokens from each model's response.
- MT-Bench: ``question.jsonl`` + ``judgements.jsonl`` -> source_task = category. One row per
  question and model: the FIRST-turn prompt with the turn-1 GPT-4 judgement / 10 (default), or
  with the mean of both turns' judgements (``mt_bench_turns="mean"``, what RouteLLM averages).
  Output tokens from the turn-1 answer quoted in the judge prompt.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from router_ml.data.adapters._common import finish_table, resolve_dir, tokens_from_chars

FOLDER = "routellm_gpt4_mixtral"
MODELS: tuple[str, ...] = ("mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview")
BENCHMARKS: tuple[str, ...] = ("mmlu", "gsm8k", "mt_bench")
_ANSWER_RE = r"(?s)\[The Start of Assistant's Answer\]\n(.*)\n\[The End of Assistant's Answer\]"


def _contaminated(folder: Path, bench: str) -> set[str]:
    file = folder / bench / "contaminated_prompts.jsonl"
    return set(pd.read_json(file, lines=True)["eval_prompt"]) if file.is_file() else set()


def _long(
    base: pd.DataFrame, scores: dict[str, pd.Series], out_chars: dict[str, pd.Series] | None
) -> pd.DataFrame:
    parts = []
    for m in MODELS:
        chars = out_chars[m] if out_chars is not None else float("nan")
        parts.append(
            base.assign(model=m, score=scores[m].astype("float64"), output_tokens=tokens_from_chars(chars))
        )
    return pd.concat(parts, ignore_index=True)


def _mmlu(folder: Path, drop: set[str]) -> pd.DataFrame:
    frames = []
    for file in sorted((folder / "mmlu").glob("mmlu_*.csv")):
        raw = pd.read_csv(file)
        raw = raw[~raw["prompt"].isin(drop)]
        base = pd.DataFrame(
            {"prompt_id": f"{FOLDER}/{file.stem}/" + raw.index.astype(str), "prompt": raw["prompt"]}
        ).assign(source_task=file.stem)
        frames.append(_long(base, {m: raw[m] for m in MODELS}, None))
    if not frames:
        raise FileNotFoundError(f"routellm: no mmlu_*.csv files under {str(folder / 'mmlu')!r}")
    return pd.concat(frames, ignore_index=True)


def _gsm8k(folder: Path, drop: set[str]) -> pd.DataFrame:
    raw = pd.read_csv(folder / "gsm8k" / "gsm8k_responses.csv")
    raw = raw[~raw["prompt"].isin(drop)]
    base = pd.DataFrame({"prompt_id": f"{FOLDER}/gsm8k/" + raw.index.astype(str), "prompt": raw["prompt"]})
    base["source_task"] = "gsm8k"
    chars = {m: raw[f"{m}_response"].fillna("").str.len().where(raw[f"{m}_response"].notna()) for m in MODELS}
    return _long(base, {m: raw[m] for m in MODELS}, chars)


def _mt_bench(folder: Path, drop: set[str], turns: str) -> pd.DataFrame:
    if turns not in ("first", "mean"):
        raise ValueError(f"routellm: mt_bench_turns must be 'first' or 'mean', got {turns!r}")
    q = pd.read_json(folder / "mt_bench" / "question.jsonl", lines=True)
    q["prompt"] = q["turns"].str[0]
    q = q[~q["prompt"].isin(drop)]
    j = pd.read_json(folder / "mt_bench" / "judgements.jsonl", lines=True)
    j = j[j["model"].isin(MODELS)]
    if (j["score"] < 1).any() or (j["score"] > 10).any():
        raise ValueError("routellm: MT-Bench judge scores outside 1..10 (failed judgements?)")
    first = j[j["turn"] == 1].set_index(["question_id", "model"])
    score = first["score"] if turns == "first" else j.groupby(["question_id", "model"])["score"].mean()
    chars = first["user_prompt"].str.extract(_ANSWER_RE, expand=False).str.len()
    base = pd.DataFrame(
        {
            "prompt_id": f"{FOLDER}/mt_bench/" + q["question_id"].astype(str),
            "prompt": q["prompt"],
            "source_task": q["category"],
        }
    )
    parts = []
    for m in MODELS:
        key = pd.MultiIndex.from_arrays([q["question_id"], [m] * len(q)])
        parts.append(
            base.assign(
                model=m,
                score=score.reindex(key).to_numpy() / 10.0,
                output_tokens=tokens_from_chars(chars.reindex(key).to_numpy()),
            )
        )
    out = pd.concat(parts, ignore_index=True)
    return out[out["score"].notna()]


def load_routellm(
    path: str | os.PathLike | None = None,
    *,
    benchmarks: Iterable[str] = BENCHMARKS,
    exclude_contaminated: bool = True,
    mt_bench_turns: str = "first",
    costs: bool = True,
) -> pd.DataFrame:
    """Long table for GPT-4 vs Mixtral on the chosen ``benchmarks`` (mmlu, gsm8k, mt_bench).

    ``exclude_contaminated`` drops the prompts in ``*/contaminated_prompts.jsonl`` (5 MMLU,
    11 GSM8K present, 8 MT-Bench), as RouteLLM does when it evaluates. Scores: MMLU/GSM8K 0/1,
    MT-Bench judge score / 10.
    """
    folder = resolve_dir(path, FOLDER)
    benchmarks = list(benchmarks)
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown or not benchmarks:
        raise ValueError(
            f"routellm: unknown benchmark(s) {unknown or benchmarks}; choose from {list(BENCHMARKS)}"
        )
    frames = []
    for bench in benchmarks:
        drop = _contaminated(folder, bench) if exclude_contaminated else set()
        if bench == "mmlu":
            frames.append(_mmlu(folder, drop))
        elif bench == "gsm8k":
            frames.append(_gsm8k(folder, drop))
        else:
            frames.append(_mt_bench(folder, drop, mt_bench_turns))
    df = pd.concat(frames, ignore_index=True)
    df["input_tokens"] = tokens_from_chars(df["prompt"].str.len())
    df["cost_usd"] = float("nan")
    df["latency_s"] = float("nan")
    return finish_table(df, FOLDER, costs=costs)
