"""routerbench, routellm, routerdc: files the adapters read in their published form, relocated.

RouterDC's ``datasets/routerbench_zs/*.csv`` and ``datasets/split2_model7/*.json`` and RouteLLM's
``routellm/evals/{mmlu,gsm8k,mt_bench}/...`` are already the tables the adapters read: each raw
file (manifest order) becomes the built file of the same position, byte for byte. When ``exclude``
removes rows from a file it is rewritten the way the reference copies were: CSV with Python's csv
module (``\\n`` line ends), JSON with ``json.dumps``; other cells are unchanged.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from router_ml.data.build import BuildError, BuildReport, Source, raw_path, read_json
from router_ml.data.prompt_text import join_list_string


def _csv(src: Path, dest: Path, exclude: frozenset[str], report: BuildReport) -> int:
    with src.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or "prompt" not in rows[0]:
        raise BuildError(f"{src}: expected a CSV with a 'prompt' column")
    col = rows[0].index("prompt")
    keep = [r for r in rows[1:] if r[col] not in exclude and join_list_string(r[col]) not in exclude]
    report.drop("excluded text", len(rows) - 1 - len(keep))
    if len(keep) == len(rows) - 1:
        shutil.copyfile(src, dest)
    else:
        with dest.open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows([rows[0], *keep])
    return len(keep)


def _json(src: Path, dest: Path, exclude: frozenset[str], report: BuildReport) -> int:
    records = read_json(src)
    if not isinstance(records, list) or not all(isinstance(r, dict) and "question" in r for r in records):
        raise BuildError(f"{src}: expected a JSON list of objects with a 'question'")
    keep = [r for r in records if r["question"] not in exclude]
    report.drop("excluded text", len(records) - len(keep))
    if len(keep) == len(records):
        shutil.copyfile(src, dest)
    else:
        dest.write_text(json.dumps(keep), encoding="utf-8")
    return len(keep)


def build(src: Source, raw_dir: Path, out: Path, exclude: frozenset[str], report: BuildReport) -> None:
    if len(src.raw) != len(src.built):
        raise BuildError(f"{src.name}: manifest lists {len(src.raw)} raw and {len(src.built)} built files")
    for raw, built in zip(src.raw, src.built, strict=True):
        path = raw_path(raw_dir, raw.path)
        dest = out / built.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if built.name.endswith(".csv"):
            report.rows[built.name] = _csv(path, dest, exclude, report)
        elif built.name.endswith(".jsonl"):
            shutil.copyfile(path, dest)
            report.rows[built.name] = sum(1 for line in dest.open(encoding="utf-8") if line.strip())
        else:
            report.rows[built.name] = _json(path, dest, exclude, report)
