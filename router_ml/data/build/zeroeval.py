"""zeroeval_math_code from yuchenlin/ZeroEval: correctness labels and output lengths per item.

Upstream outputs are ``result_dirs/<task>/<model>.json`` (task gsm, math-l5, crux). The labels are
ZeroEval's own: its scorers (``src/evaluation/math_eval.py gsm`` / ``math-l5`` and
``crux_eval.py``, at the pinned revision) copy each item to ``result_dirs_parsed/<task>/<model>.json``
with ``model_answer`` (``{raw, sanitized, first_number}``) and ``matched`` (True / False /
"No answer extracted"). This build reads those parsed files: ``correct = matched is True``,
``model_answer`` = the raw extracted answer, ``output_chars`` / ``output_words`` of ``output[0]``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from router_ml.data.build import BuildError, BuildReport, Source, read_json

TASKS: tuple[str, ...] = ("gsm", "math-l5", "crux")
ITEM_SOURCE = {"gsm": "openai/gsm8k", "math-l5": "MATH level 5", "crux": "cruxeval-org/cruxeval"}
SCORER = {"gsm": "src/evaluation/math_eval.py gsm", "math-l5": "src/evaluation/math_eval.py math-l5",
          "crux": "src/evaluation/crux_eval.py"}  # fmt: skip


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


def _parsed(src: Source, raw_dir: Path, rel: str, task: str) -> list:
    path = raw_dir / parsed_path(rel)
    if not path.is_file():
        hint = (
            f"the raw output {rel!r} is there; score it with ZeroEval's own scorer: in a checkout of "
            f"{src.repo} at {src.revision} holding these result_dirs, run `python {SCORER[task]}`"
            if (raw_dir / rel).is_file()
            else f"neither it nor the raw output {rel!r} is there"
        )
        raise BuildError(
            f"zeroeval: scored file {parsed_path(rel)!r} not found under {str(raw_dir)!r}; {hint}"
        )
    data = read_json(path)
    if not isinstance(data, list):
        raise BuildError(f"{path}: expected a JSON list of items")
    return data


def _text(output: object) -> str:
    if isinstance(output, list):
        output = output[0] if output else ""
    return output if isinstance(output, str) else ""


def build(src: Source, raw_dir: Path, out: Path, exclude: frozenset[str], report: BuildReport) -> None:
    items: dict[tuple[str, str], dict] = {}
    rows = []
    for raw in src.raw:
        task, model = _task_model(raw.path)
        for k, it in enumerate(_parsed(src, raw_dir, raw.path, task)):
            where = f"{parsed_path(raw.path)}[{k}]"
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
