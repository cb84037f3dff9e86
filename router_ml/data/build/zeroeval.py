"""zeroeval_math_code from yuchenlin/ZeroEval: correctness labels and output lengths per item.

Upstream outputs are ``result_dirs/<task>/<model>.json`` (task gsm, math-l5, crux): per item its
``id``, ``question`` (``problem`` for math-l5), gold ``answer``, ``generator`` and the raw
``output``. The labels are ZeroEval's own verdicts (its ``src/evaluation/math_eval.py gsm`` /
``math-l5`` and ``crux_eval.py`` at the pinned revision), which this build derives from the raw
outputs with :class:`router_ml.scoring.zeroeval.ZeroEvalScorer`, a reimplementation of those rules:
``matched`` (True / False / "No answer extracted"), ``correct = matched is True``,
``model_answer`` = the answer as ZeroEval records it, ``output_chars`` / ``output_words`` of
``output[0]``.

Where only ZeroEval's scored copy is at hand (``result_dirs_parsed/<task>/<model>.json``, written
by its scorers, with ``model_answer`` and ``matched`` per item) the build reads the verdicts from
it instead.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from router_ml.data.build import BuildError, BuildReport, Source, read_json
from router_ml.scoring.base import Example
from router_ml.scoring.zeroeval import ZeroEvalScorer

TASKS: tuple[str, ...] = ("gsm", "math-l5", "crux")
ITEM_SOURCE = {"gsm": "openai/gsm8k", "math-l5": "MATH level 5", "crux": "cruxeval-org/cruxeval"}


def parsed_path(raw_rel: str) -> str:
    """``result_dirs/<task>/<model>.json`` -> ``result_dirs_parsed/<task>/<model>.json``."""
    return raw_rel.replace("result_dirs/", "result_dirs_parsed/", 1)


def _task_model(rel: str) -> tuple[str, str]:
    parts = rel.split("/")
    if (
        len(parts) != 3
        or parts[0] != "result_dirs"
        or parts[1] not in TASKS
        or not parts[2].endswith(".json")
    ):
        raise BuildError(f"zeroeval: unexpected raw file {rel!r}")
    return parts[1], parts[2][: -len(".json")]


def _items(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise BuildError(f"{path}: expected a JSON list of items")
    return data


def _scored(raw_dir: Path, rel: str, task: str, model: str) -> tuple[str, list]:
    """(the file read, its items with ``matched`` and ``model_answer``): the raw outputs scored
    here, or ZeroEval's own scored copy where the raw file is absent."""
    raw = raw_dir / rel
    if raw.is_file():
        scorer = ZeroEvalScorer(task, model)
        items = _items(raw)
        for k, it in enumerate(items):
            if not isinstance(it, dict) or "answer" not in it or "output" not in it:
                raise BuildError(f"{rel}[{k}]: expected an object with 'answer' (gold) and 'output'")
            ex = Example(prompt="", answer=_text(it["output"]), reference=str(it["answer"]))
            it["matched"], answer = scorer.verdict(ex)
            it["model_answer"] = {"raw": answer}
        return rel, items
    parsed = raw_dir / parsed_path(rel)
    if parsed.is_file():
        return parsed_path(rel), _items(parsed)
    raise BuildError(
        f"zeroeval: raw output {rel!r} not found under {str(raw_dir)!r} (nor ZeroEval's scored copy "
        f"{parsed_path(rel)!r})"
    )


def _text(output: object) -> str:
    if isinstance(output, list):
        output = output[0] if output else ""
    return output if isinstance(output, str) else ""


def build(src: Source, raw_dir: Path, out: Path, exclude: frozenset[str], report: BuildReport) -> None:
    items: dict[tuple[str, str], dict] = {}
    rows = []
    for raw in src.raw:
        task, model = _task_model(raw.path)
        read, scored = _scored(raw_dir, raw.path, task, model)
        for k, it in enumerate(scored):
            where = f"{read}[{k}]"
            if not isinstance(it, dict) or "id" not in it or "matched" not in it:
                raise BuildError(f"{where}: expected an object with 'id' and 'matched'")
            question = it.get("question", it.get("problem"))
            if not isinstance(question, str):
                raise BuildError(f"{where}: no 'question' (or 'problem') text")
            if question in exclude:
                report.drop("excluded text")
                continue
            key = (task, str(it["id"]))
            items.setdefault(
                key, {"question": question, "answer": str(it.get("answer")), "source": ITEM_SOURCE[task]}
            )
            answer = it.get("model_answer")
            answer = answer.get("raw") if isinstance(answer, dict) else answer
            text = _text(it.get("output"))
            rows.append(
                {
                    "task": task,
                    "item_id": key[1],
                    "model": model,
                    "generator": it.get("generator"),
                    "correct": int(it["matched"] is True),
                    "matched": str(it["matched"]),
                    "model_answer": None if answer is None else str(answer),
                    "output_chars": len(text),
                    "output_words": len(text.split()),
                }
            )
    order = {t: i for i, t in enumerate(TASKS)}
    keys = sorted(items, key=lambda key: order[key[0]])  # stable: items in order of first appearance
    it_df = pd.DataFrame([{"task": t, "item_id": i, **items[(t, i)]} for t, i in keys])
    out_df = pd.DataFrame(rows).astype({"correct": "int64", "output_chars": "int64", "output_words": "int64"})
    it_df.to_parquet(out / "items.parquet", index=False)
    out_df.to_parquet(out / "model_outcomes.parquet", index=False)
    report.rows.update({"items.parquet": len(it_df), "model_outcomes.parquet": len(out_df)})
