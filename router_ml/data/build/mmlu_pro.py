"""mmlu_pro_model_outputs from TIGER-AI-Lab/MMLU-Pro: one row per (question, model) outcome.

Upstream: ``eval_results/model_outputs_<model>_5shots.zip``, each holding one JSON list of
``{question_id, question, options, answer, answer_index, cot_content, category, src, pred,
generated_text}``. Non-object entries are skipped (43 in DeepSeek-Coder-V2's file);
``correct = pred == answer``; ``generated_chars = len(generated_text)``. Questions come from
their first appearance (zips in name order), sorted by id; options as a JSON list.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pandas as pd

from router_ml.data.build import BuildError, BuildReport, Source, raw_path
from router_ml.data.prompt_text import format_question

QUESTION_FIELDS = ("question", "options", "answer", "answer_index", "category", "src")
PREFIX, SUFFIX = "eval_results/model_outputs_", "_5shots.zip"


def _records(path: Path) -> list:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".json")]
            if len(members) != 1:
                raise BuildError(f"{path}: expected one .json file in the zip, found {members}")
            data = json.loads(zf.read(members[0]).decode("utf-8"))
    except zipfile.BadZipFile as err:
        raise BuildError(f"{path}: not a zip file ({err})") from None
    except json.JSONDecodeError as err:
        raise BuildError(f"{path}: invalid JSON inside ({err.msg})") from None
    if not isinstance(data, list):
        raise BuildError(f"{path}: expected a JSON list of records")
    return data


def build(src: Source, raw_dir: Path, out: Path, exclude: frozenset[str], report: BuildReport) -> None:
    questions: dict[int, dict] = {}
    outcomes = []
    for raw in src.raw:
        if not (raw.path.startswith(PREFIX) and raw.path.endswith(SUFFIX)):
            raise BuildError(f"mmlu_pro: unexpected raw file {raw.path!r}")
        model = raw.path[len(PREFIX) : -len(SUFFIX)]
        seen: set[int] = set()
        for rec in _records(raw_path(raw_dir, raw.path)):
            if not isinstance(rec, dict):
                report.drop("not an object")
                continue
            qid = int(rec["question_id"])
            if qid in seen:
                report.drop("repeated question in one file")
                continue
            seen.add(qid)
            text = rec["question"]
            if text in exclude or format_question(text, list(rec["options"])) in exclude:
                report.drop("excluded text")
                continue
            questions.setdefault(qid, {k: rec[k] for k in QUESTION_FIELDS})
            pred = rec.get("pred")
            outcomes.append(
                {
                    "question_id": qid,
                    "model": model,
                    "pred": pred,
                    "correct": int(pred is not None and pred == rec["answer"]),
                    "generated_chars": len(rec.get("generated_text") or ""),
                }
            )
    q = pd.DataFrame([{"question_id": k, **v} for k, v in sorted(questions.items())])
    q["options"] = [json.dumps(list(o), ensure_ascii=False) for o in q["options"]]
    q = q.astype({"question_id": "int64", "answer_index": "int64"})
    o = pd.DataFrame(outcomes).astype(
        {"question_id": "int64", "correct": "int64", "generated_chars": "int64"}
    )
    q.to_parquet(out / "questions.parquet", index=False)
    o.to_parquet(out / "model_outcomes.parquet", index=False)
    report.rows.update({"questions.parquet": len(q), "model_outcomes.parquet": len(o)})
