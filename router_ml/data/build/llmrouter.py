"""llmrouter_ulab from ulab-uiuc/LLMRouter: ``train.json`` joined with the query files.

Upstream: ``data/dcrouter_preprocessed/train.json`` (a JSON list of ``{question, scores,
cluster_id}``) and ``data/example_data/query_data/default_query_{train,test}.jsonl`` (one
``{query, task_name, ground_truth, metric, choices, task_id}`` per line). Each train.json record is
joined on its exact question text with the first query record of that text (train file first);
``prompt_id`` = ``train-NNNNN``, its index in train.json. The manifest pins the indices the
reference copy leaves out; ``llm_candidates.json`` is ``default_llm.json`` as published.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from router_ml.data.build import BuildError, BuildReport, Source, raw_path, read_json
from router_ml.data.jsonl import iter_jsonl

TRAIN = "data/dcrouter_preprocessed/train.json"
QUERIES = (
    "data/example_data/query_data/default_query_train.jsonl",
    "data/example_data/query_data/default_query_test.jsonl",
)
CANDIDATES = "data/example_data/llm_candidates/default_llm.json"
QUERY_FIELDS = ("task_name", "metric", "ground_truth", "choices", "task_id")


def build(src: Source, raw_dir: Path, out: Path, exclude: frozenset[str], report: BuildReport) -> None:
    train = read_json(raw_path(raw_dir, TRAIN))
    if not isinstance(train, list):
        raise BuildError(f"{TRAIN}: expected a JSON list of records")
    queries: dict[str, dict] = {}
    for rel in QUERIES:
        for where, _, rec in iter_jsonl(raw_path(raw_dir, rel), BuildError):
            if not isinstance(rec, dict) or not isinstance(rec.get("query"), str):
                raise BuildError(f"{where}: expected an object with a string 'query'")
            queries.setdefault(rec["query"], rec)
    skip = set(src.options.get("exclude_train_indices", ()))
    n = 0
    with (out / "train.jsonl").open("w", encoding="utf-8") as fh:
        for i, rec in enumerate(train):
            if i in skip:
                report.drop("pinned train.json index")
                continue
            if not isinstance(rec, dict) or not {"question", "scores"} <= rec.keys():
                raise BuildError(f"{TRAIN}[{i}]: expected an object with 'question' and 'scores'")
            text = rec["question"]
            if text in exclude:
                report.drop("excluded text")
                continue
            query = queries.get(text)
            if query is None:
                report.drop("no query record with this text")
                continue
            row = {"prompt_id": f"train-{i:05d}", "task_name": query.get("task_name"), "prompt": text}
            row.update({k: query.get(k) for k in QUERY_FIELDS[1:]})
            row["cluster_id"] = rec.get("cluster_id")
            row["scores"] = rec["scores"]
            fh.write(json.dumps(row) + "\n")
            n += 1
    report.rows["train.jsonl"] = n
    shutil.copyfile(raw_path(raw_dir, CANDIDATES), out / "llm_candidates.json")
    report.rows["llm_candidates.json"] = len(read_json(out / "llm_candidates.json"))
