"""Rebuild scripts: raw-form slices written here from the shared copies, rebuilt, compared row by row.

Each test inverts a slice of the shared copy into the upstream raw form that the source's
PROVENANCE.md describes, runs its builder, and checks that every rebuilt row equals the same row of
the shared copy. Skips (saying why) when the shared data is absent.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from router_ml.data.build import build_source, get_source, read_exclude, sha256_file, sources


def _matched(name: str, n: int) -> None:
    print(f"\n{name}: {n}/{n} rebuilt rows match the shared copy")


def _norm(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    df = df.sort_values(keys, kind="stable").reset_index(drop=True).astype(object)
    return df.where(df.notna(), None)


def _assert_same(built: pd.DataFrame, expected: pd.DataFrame, keys: list[str]) -> int:
    assert len(built) == len(expected) > 0
    pd.testing.assert_frame_equal(_norm(built, keys), _norm(expected[built.columns], keys), check_exact=True)
    return len(built)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def test_manifest_hashes_of_verbatim_files_match_the_shared_copy(shared_data):
    checked = 0
    for src in sources().values():
        pairs = zip(src.raw, src.built, strict=True) if len(src.raw) == len(src.built) else ()
        for raw, built in pairs:
            if raw.sha256 is not None:
                assert sha256_file(shared_data / src.folder / built.name) == raw.sha256, raw.path
                checked += 1
        for raw in src.raw:
            assert raw.sha256 is not None or raw.note.startswith("not available here"), raw.path
    assert (
        sha256_file(shared_data / "llmrouter_ulab" / "llm_candidates.json")
        == get_source("llmrouter").raw[3].sha256
    )
    assert checked == 4 + 5 + 10  # routerbench arc/winogrande, routellm jsonl files, routerdc untouched files


def test_llmrouter_rebuilds_train_jsonl_from_train_json_and_query_files(shared_data, tmp_path):
    folder = shared_data / "llmrouter_ulab"
    lines = (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = {int(json.loads(x)["prompt_id"].split("-")[1]): (x, json.loads(x)) for x in lines}
    n_train = 400  # indices 0..399: 391 kept rows and 9 the source leaves out
    train, queries = [], ([], [])
    for i in range(n_train):
        if i not in rows:  # a row the reference copy dropped: any content, it must not come back
            train.append({"question": f"dropped row {i}", "scores": {"m": 0.0}, "cluster_id": 0})
            queries[0].append({"query": f"dropped row {i}", "task_name": "mmlu"})
            continue
        rec = rows[i][1]
        train.append({"question": rec["prompt"], "scores": rec["scores"], "cluster_id": rec["cluster_id"]})
        q = {
            "query": rec["prompt"],
            **{k: rec[k] for k in ("task_name", "ground_truth", "metric", "choices", "task_id")},
        }
        queries[i % 2].append(q)
    raw = tmp_path / "raw"
    _write(raw / "data/dcrouter_preprocessed/train.json", json.dumps(train, indent=2))
    for name, qs in zip(("train", "test"), queries, strict=True):
        text = "".join(json.dumps(q) + "\n" for q in reversed(qs))  # order must not matter
        _write(raw / f"data/example_data/query_data/default_query_{name}.jsonl", text)
    _write(
        raw / "data/example_data/llm_candidates/default_llm.json",
        (folder / "llm_candidates.json").read_text(),
    )
    report = build_source("llmrouter", raw, tmp_path / "out")
    built = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    expected = [rows[i][0] for i in sorted(rows) if i < n_train]
    assert built == expected  # byte for byte, line by line
    assert report.dropped == {"pinned train.json index": n_train - len(expected)}
    assert sha256_file(tmp_path / "out" / "llm_candidates.json") == sha256_file(
        folder / "llm_candidates.json"
    )
    _matched("llmrouter train.jsonl", len(built))


def test_routerbench_csvs_rebuild_and_exclude(shared_data, tmp_path):
    src = get_source("routerbench")
    raw, expected = tmp_path / "raw", {}
    for r, b in zip(src.raw, src.built, strict=True):
        rows = _csv_rows(shared_data / src.folder / b.name)[:41]  # header + 40 rows
        _write_csv(raw / r.path, rows)
        expected[b.name] = rows
    build_source("routerbench", raw, tmp_path / "out")
    n = 0
    for name, rows in expected.items():
        assert _csv_rows(tmp_path / "out" / name) == rows
        n += len(rows) - 1
    _matched("routerbench CSVs", n)
    # a prompt text to leave out: only that row goes, every other cell is unchanged
    drop = expected["mbpp_train.csv"][1][expected["mbpp_train.csv"][0].index("prompt")]
    excl = tmp_path / "exclude.jsonl"
    excl.write_text(json.dumps(drop) + "\n")
    report = build_source("routerbench", raw, tmp_path / "out2", exclude=read_exclude(excl))
    assert _csv_rows(tmp_path / "out2" / "mbpp_train.csv") == [
        expected["mbpp_train.csv"][0],
        *expected["mbpp_train.csv"][2:],
    ]
    assert report.dropped == {"excluded text": 1}


def test_routellm_files_rebuild(shared_data, tmp_path):
    src = get_source("routellm")
    raw, n = tmp_path / "raw", 0
    for r, b in zip(src.raw, src.built, strict=True):
        path = shared_data / src.folder / b.name
        if b.name.endswith(".csv"):
            _write_csv(raw / r.path, _csv_rows(path)[: 31 if "gsm8k" in b.name else 6])
        else:
            _write(raw / r.path, "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:40]))
    build_source("routellm", raw, tmp_path / "out")
    for b in src.built:
        if b.name.endswith(".csv"):
            rows = _csv_rows(tmp_path / "out" / b.name)
            assert rows == _csv_rows(shared_data / src.folder / b.name)[: len(rows)]
            n += len(rows) - 1
        else:
            lines = (tmp_path / "out" / b.name).read_text(encoding="utf-8").splitlines()
            assert (
                lines
                == (shared_data / src.folder / b.name).read_text(encoding="utf-8").splitlines()[: len(lines)]
            )
            n += len(lines)
    _matched("routellm CSV + JSONL", n)


def test_routerdc_json_files_rebuild(shared_data, tmp_path):
    src = get_source("routerdc")
    raw, n = tmp_path / "raw", 0
    for r, b in zip(src.raw, src.built, strict=True):
        records = json.loads((shared_data / src.folder / b.name).read_text(encoding="utf-8"))[:20]
        _write(raw / r.path, json.dumps(records))
    build_source("routerdc", raw, tmp_path / "out")
    for b in src.built:
        built = json.loads((tmp_path / "out" / b.name).read_text(encoding="utf-8"))
        assert built == json.loads((shared_data / src.folder / b.name).read_text(encoding="utf-8"))[:20]
        n += len(built)
    _matched("routerdc JSON", n)


def test_mmlu_pro_rebuilds_tables_from_model_output_zips(shared_data, tmp_path):
    folder = shared_data / "mmlu_pro_model_outputs"
    q = pd.read_parquet(folder / "questions.parquet").head(30)
    o = pd.read_parquet(folder / "model_outcomes.parquet")
    o = o[o["question_id"].isin(q["question_id"])]
    qmap = q.set_index("question_id")
    raw = tmp_path / "raw"
    for k, r in enumerate(get_source("mmlu_pro").raw):
        model = r.path.removeprefix("eval_results/model_outputs_").removesuffix("_5shots.zip")
        records: list = ["a non-object entry, skipped"] if k == 0 else []
        for row in o[o["model"] == model].itertuples():
            qr = qmap.loc[row.question_id]
            records.append(
                {
                    "question_id": int(row.question_id),
                    "question": qr["question"],
                    "options": json.loads(qr["options"]),
                    "answer": qr["answer"],
                    "answer_index": int(qr["answer_index"]),
                    "cot_content": "",
                    "category": qr["category"],
                    "src": qr["src"],
                    "pred": None if pd.isna(row.pred) else row.pred,
                    "generated_text": "x" * row.generated_chars,
                }
            )
        (raw / r.path).parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(raw / r.path, "w") as zf:
            zf.writestr(f"{model}.json", json.dumps(records))
    report = build_source("mmlu_pro", raw, tmp_path / "out")
    bq = pd.read_parquet(tmp_path / "out" / "questions.parquet")
    bo = pd.read_parquet(tmp_path / "out" / "model_outcomes.parquet")
    n = _assert_same(bq, q, ["question_id"]) + _assert_same(bo, o, ["model", "question_id"])
    assert report.dropped == {"not an object": 1}
    _matched("mmlu_pro questions + outcomes", n)


def _text_of(chars: int, words: int) -> str:
    """A text of exactly ``chars`` characters and ``words`` whitespace-separated words."""
    if words == 0:
        return " " * chars
    return "a" * (chars - 2 * (words - 1)) + " a" * (words - 1)


def test_zeroeval_rebuilds_tables_from_scored_result_files(shared_data, tmp_path):
    folder = shared_data / "zeroeval_math_code"
    items = pd.read_parquet(folder / "items.parquet").groupby("task", sort=False).head(10)
    o = pd.read_parquet(folder / "model_outcomes.parquet").merge(items[["task", "item_id"]])
    imap = items.set_index(["task", "item_id"])
    raw = tmp_path / "raw"
    for r in get_source("zeroeval").raw:
        _, task, file = r.path.split("/")
        model = file.removesuffix(".json")
        parsed = []
        for row in o[(o["task"] == task) & (o["model"] == model)].itertuples():
            it = imap.loc[(task, row.item_id)]
            matched = {"True": True, "False": False}.get(row.matched, row.matched)
            assert row.output_chars >= 2 * row.output_words - 1
            parsed.append(
                {
                    "id": row.item_id,
                    "question" if task != "math-l5" else "problem": it["question"],
                    "answer": it["answer"],
                    "output": [_text_of(row.output_chars, row.output_words)],
                    "generator": row.generator,
                    "model_answer": {"raw": None if pd.isna(row.model_answer) else row.model_answer},
                    "matched": matched,
                }
            )
        _write(raw / r.path.replace("result_dirs/", "result_dirs_parsed/", 1), json.dumps(parsed))
    build_source("zeroeval", raw, tmp_path / "out")
    bi = pd.read_parquet(tmp_path / "out" / "items.parquet")
    bo = pd.read_parquet(tmp_path / "out" / "model_outcomes.parquet")
    assert bi[["task", "item_id"]].values.tolist() == items[["task", "item_id"]].values.tolist()
    n = _assert_same(bi, items, ["task", "item_id"]) + _assert_same(bo, o, ["task", "item_id", "model"])
    _matched("zeroeval items + outcomes", n)


def _zeroeval_output(matched: str, model_answer: str | None, chars: int, words: int) -> str:
    """A raw output of exactly ``chars`` characters and ``words`` words from which ZeroEval reads
    ``model_answer`` (a JSON reply, padded), or no answer at all."""
    head = (
        ""
        if matched == "No answer extracted"
        else '{"answer":' + json.dumps(model_answer, ensure_ascii=False) + "}"
    )
    chars, words = chars - len(head), words - len(head.split())
    assert chars >= 0 and words >= 0
    if words == 0 or not head:
        return head + (" " * chars if words == 0 else _text_of(chars, words))
    return head + " " + _text_of(chars - 1, words)


def test_zeroeval_rebuilds_labels_by_scoring_raw_outputs(shared_data, tmp_path):
    """The raw result files only (no scored copy): the build derives every verdict itself."""
    folder = shared_data / "zeroeval_math_code"
    items = pd.read_parquet(folder / "items.parquet").groupby("task", sort=False).head(10)
    o = pd.read_parquet(folder / "model_outcomes.parquet").merge(items[["task", "item_id"]])
    imap = items.set_index(["task", "item_id"])
    raw = tmp_path / "raw"
    for r in get_source("zeroeval").raw:
        _, task, file = r.path.split("/")
        model = file.removesuffix(".json")
        rows = []
        for row in o[(o["task"] == task) & (o["model"] == model)].itertuples():
            it = imap.loc[(task, row.item_id)]
            answer = None if pd.isna(row.model_answer) else row.model_answer
            rows.append(
                {
                    "id": row.item_id,
                    "question" if task != "math-l5" else "problem": it["question"],
                    "answer": it["answer"],
                    "output": [_zeroeval_output(row.matched, answer, row.output_chars, row.output_words)],
                    "generator": row.generator,
                }
            )
        _write(raw / r.path, json.dumps(rows))
    build_source("zeroeval", raw, tmp_path / "out")
    bi = pd.read_parquet(tmp_path / "out" / "items.parquet")
    bo = pd.read_parquet(tmp_path / "out" / "model_outcomes.parquet")
    assert set(o["matched"]) == {"True", "False", "No answer extracted"}  # every verdict kind is in the slice
    n = _assert_same(bi, items, ["task", "item_id"]) + _assert_same(bo, o, ["task", "item_id", "model"])
    _matched("zeroeval items + outcomes scored from raw outputs", n)


def test_zeroeval_without_raw_or_scored_files_names_the_missing_file(tmp_path):
    raw = tmp_path / "raw"
    _write(raw / "placeholder.txt", "")
    first = get_source("zeroeval").raw[0].path
    with pytest.raises(ValueError, match=rf"raw output '{first}' not found"):
        build_source("zeroeval", raw, tmp_path / "out")


def test_alpaca_eval_rebuilds_tables_from_annotation_files(shared_data, tmp_path):
    folder = shared_data / "alpaca_eval_annotations"
    ins = pd.read_parquet(folder / "instructions.parquet").head(25)
    p = pd.read_parquet(folder / "model_preferences.parquet")
    p = p[p["instruction_id"].isin(ins["instruction_id"])]
    imap = ins.set_index("instruction_id")
    raw = tmp_path / "raw"
    for r in get_source("alpaca_eval").raw:
        model = r.path.split("/")[1]
        ann = [
            {
                "instruction": imap.loc[row.instruction_id, "instruction"],
                "dataset": imap.loc[row.instruction_id, "dataset"],
                "output_1": "b" * row.baseline_chars,
                "generator_1": row.baseline,
                "output_2": "m" * row.output_chars,
                "generator_2": model,
                "annotator": "weighted_alpaca_eval_gpt4_turbo",
                "preference": row.preference,
            }
            for row in p[p["model"] == model].itertuples()
        ]
        _write(raw / r.path, json.dumps(ann))
    build_source("alpaca_eval", raw, tmp_path / "out")
    bi = pd.read_parquet(tmp_path / "out" / "instructions.parquet")
    bp = pd.read_parquet(tmp_path / "out" / "model_preferences.parquet")
    n = _assert_same(bi, ins, ["instruction_id"]) + _assert_same(bp, p, ["model", "instruction_id"])
    _matched("alpaca_eval instructions + preferences", n)


def test_missing_raw_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"raw file 'data/dcrouter_preprocessed/train.json' not found"):
        build_source("llmrouter", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
