"""Data layer on the real data sets: adapters, validation, prices, labelled sets, leak-free splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from router_ml.data.adapters import (
    ADAPTERS,
    SOURCE_FOLDERS,
    MalformedRecordError,
    load_llmrouter,
    load_source,
)
from router_ml.data.default import DEFAULT_FILE, check_default, compact_prices, write_default
from router_ml.data.labelled import LabelledDataError, load_benchmark_task_labels, load_labelled
from router_ml.data.prices import (
    MODEL_PRICE_KEYS,
    OUTPUT_TOKEN_PRIOR,
    SHIPPED_PRICES_KEY,
    attach_costs,
    estimate_tokens,
    load_price_table,
    model_prices,
    shipped_llmrouter_prices,
)
from router_ml.data.schema import RoutingTableError, read_table, table_hash, validate_table, write_table
from router_ml.data.splits import kfold_prompts, normalize_series, normalize_text, split_prompts, split_tasks
from router_ml.data.taxonomy import TASK_TYPES

# PROVENANCE figures: (prompts, models, rows)
EXPECTED = {
    "llmrouter": (5478, 9, 5478 * 9),
    "routerbench": (3162, 11, 3162 * 11 - 154),  # 154 empty score cells dropped
    "routellm": (13987 + 1212 + 72, 2, 2 * (13987 + 1212 + 72)),  # contaminated prompts dropped
    "routerdc": (20352 - 3475 - 2000 - 1346, 7, 7 * (20352 - 3475 - 2000 - 1346)),  # no cmmlu/ceval
    "mmlu_pro": (12008, 29, 346520),
    "zeroeval": (2744, 57, 117679),
    "alpaca_eval": (805, 55, 44265),
}
UNPRICED = {"jina-chat", "text_davinci_001", "text_davinci_003", "reka-core-20240501", "reka-flash-20240226"}


@pytest.fixture(scope="module")
def tables(shared_data: Path) -> dict[str, pd.DataFrame]:
    """Every source loaded once with its default options."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the documented unpriced models
        return {name: load_source(name) for name in SOURCE_FOLDERS}  # "collected": a user's store


# --- adapters on the real files -------------------------------------------------------------


def test_registry_names_every_source_and_rejects_unknown() -> None:
    assert set(ADAPTERS) - {"collected"} == set(EXPECTED) == set(SOURCE_FOLDERS)
    with pytest.raises(KeyError, match=r"unknown data source 'nope'.*llmrouter.*routerbench"):
        load_source("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_adapter_matches_provenance(tables: dict[str, pd.DataFrame], name: str) -> None:
    df = tables[name]
    n_prompts, n_models, n_rows = EXPECTED[name]
    assert df["prompt_id"].nunique() == n_prompts
    assert df["model"].nunique() == n_models
    assert len(df) == n_rows
    assert df["score"].between(0, 1).all()
    assert (df["source"] == SOURCE_FOLDERS[name]).all()
    assert df["prompt_id"].str.startswith(SOURCE_FOLDERS[name] + "/").all()
    assert set(df["task"]) <= set(TASK_TYPES)
    pd.testing.assert_frame_equal(validate_table(df), df)  # already canonical
    assert df[["input_tokens", "output_tokens"]].notna().all().all()
    priced = ~df["model"].isin(UNPRICED)
    assert df.loc[priced, "cost_usd"].gt(0).all() and df.loc[~priced, "cost_usd"].isna().all()


def test_prompt_ids_never_collide_across_sources(tables: dict[str, pd.DataFrame]) -> None:
    ids = [set(t["prompt_id"]) for t in tables.values()]
    assert sum(len(s) for s in ids) == len(set().union(*ids))


def test_llmrouter_tasks_and_estimated_costs(tables: dict[str, pd.DataFrame]) -> None:
    df = tables["llmrouter"]
    per_task = df.drop_duplicates("prompt_id")["source_task"].value_counts()
    assert len(per_task) == 14 and per_task["math"] == 504 and per_task["human_eval"] == 113
    row = df[df["model"] == "gemma-2-9b-it"].iloc[0]  # $0.10 / 1M in and out (llm_candidates.json)
    assert row["input_tokens"] == estimate_tokens(row["prompt"])
    assert row["output_tokens"] == OUTPUT_TOKEN_PRIOR[row["task"]]
    assert row["cost_usd"] == pytest.approx((row["input_tokens"] + row["output_tokens"]) * 0.10 / 1e6)


def test_routerbench_measured_costs_splits_and_prompts(
    tables: dict[str, pd.DataFrame], shared_data: Path
) -> None:
    df = tables["routerbench"]
    raw = pd.read_csv(shared_data / SOURCE_FOLDERS["routerbench"] / "mbpp_test.csv")
    pid = f"routerbench_subset_routerdc/mbpp_test/{int(raw.iloc[0, 0])}"
    got = df[(df["prompt_id"] == pid) & (df["model"] == "claude-v2")]["cost_usd"].item()
    assert got == raw.iloc[0]["claude-v2|total_cost"]
    assert df.drop_duplicates("prompt_id")["split"].value_counts().to_dict() == {"train": 2213, "test": 949}
    assert not df["prompt"].str.startswith("['").any()
    assert df["sample_id"].duplicated().any()  # the source's ids repeat; ours do not
    acc = df[df["model"] == "gpt-4-1106-preview"].groupby("source_task")["score"].mean()
    assert acc["arc-challenge"] == pytest.approx(0.95, abs=0.01) and acc["mbpp"] == pytest.approx(
        0.69, abs=0.02
    )


def test_routerbench_prices_reproduce_measured_costs(tables: dict[str, pd.DataFrame]) -> None:
    """Re-pricing with our price map and chars/4 tokens lands within 10% of RouterBench's bills."""
    df = tables["routerbench"]
    est = attach_costs(df.assign(cost_usd=np.nan))["cost_usd"]
    ratio = (est / df["cost_usd"]).groupby(df["model"]).median()
    assert ratio.between(0.9, 1.1).all(), ratio.to_dict()


def test_routellm_benchmarks_and_options(tables: dict[str, pd.DataFrame], shared_data: Path) -> None:
    df = tables["routellm"]
    bench = df["prompt_id"].str.split("/").str[1].str.replace(r"^mmlu_.*", "mmlu", regex=True)
    acc = df.groupby([bench, "model"])["score"].mean()
    assert acc[("mmlu", "gpt-4-1106-preview")] == pytest.approx(0.81, abs=0.01)
    assert acc[("gsm8k", "mistralai/Mixtral-8x7B-Instruct-v0.1")] == pytest.approx(0.64, abs=0.01)
    mt = df[bench == "mt_bench"]
    assert set(mt["source_task"]) == {
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    }
    judge = pd.read_json(
        shared_data / SOURCE_FOLDERS["routellm"] / "mt_bench" / "judgements.jsonl", lines=True
    )
    turn1 = judge[judge["turn"] == 1].set_index(["question_id", "model"])["score"]
    row = mt[mt["model"] == "gpt-4-1106-preview"].iloc[0]
    assert row["score"] == turn1[(int(row["prompt_id"].rsplit("/", 1)[1]), row["model"])] / 10
    raw = load_source(
        "routellm", benchmarks=("gsm8k", "mt_bench"), exclude_contaminated=False, mt_bench_turns="mean"
    )
    assert raw["prompt_id"].nunique() == 1223 + 80
    mean_mt = raw[raw["source_task"] != "gsm8k"].set_index(["prompt_id", "model"])["score"]
    first_mt = mt.set_index(["prompt_id", "model"])["score"]
    assert (mean_mt.reindex(first_mt.index) != first_mt).any()  # the turn-2 judgement changes some scores
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_source("routellm", benchmarks=("mmlu", "hellaswag"))


def test_routerdc_splits_and_chinese_option(tables: dict[str, pd.DataFrame]) -> None:
    df = tables["routerdc"]
    ood = set(df.loc[df["split"] == "ood", "source_task"])
    assert ood == {"MATH_prealgebra", "mbpp", "javascript"}
    assert set(df["split"]) == {"train", "test", "ood"}
    full = load_source("routerdc", include_chinese=True, costs=False)
    assert full["prompt_id"].nunique() == 20352
    assert set(full.loc[full["split"] == "ood", "source_task"]) == ood | {"ceval"}


def test_mmlu_pro_alpaca_zeroeval_details(tables: dict[str, pd.DataFrame]) -> None:
    mp = tables["mmlu_pro"]
    assert mp["prompt"].str.contains("\nA. ").all() and mp["source_task"].nunique() == 14
    assert mp.groupby("model")["score"].mean()["gemini-1.5-pro-002"] == pytest.approx(0.70, abs=0.01)
    win = tables["alpaca_eval"].groupby("model")["score"].mean()
    assert win[win.index.str.startswith("FuseChat")].between(0.29, 0.72).all()
    assert win.drop(win.index[win.index.str.startswith("FuseChat")]).max() < 0.2
    ze = tables["zeroeval"]
    assert set(ze["source_task"]) == {"gsm", "math-l5", "crux"}
    assert ze.loc[ze["source_task"] == "crux", "task"].eq("code").all()


# --- llmrouter adapter on any JSONL ------------------------------------------------------------


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_llmrouter_reads_any_jsonl_and_names_bad_lines(tmp_path: Path, shared_data: Path) -> None:
    good = [
        {
            "prompt": "What is 2+2?",
            "task_name": "gsm8k",
            "scores": {"qwen2.5-7b-instruct": 1.0, "gemma-2-9b-it": 0},
        },
        {"prompt": "Write a function.", "task_name": "mbpp", "scores": {"qwen2.5-7b-instruct": 0.5}},
    ]
    file = _write_jsonl(tmp_path / "tiny.jsonl", [json.dumps(r) for r in good])
    df = load_llmrouter(file)
    assert len(df) == 3 and set(df["prompt_id"]) == {"llmrouter_ulab/tiny-1", "llmrouter_ulab/tiny-2"}
    assert (
        df.set_index(["prompt_id", "model"]).loc[("llmrouter_ulab/tiny-2", "qwen2.5-7b-instruct"), "score"]
        == 0.5
    )
    assert df["task"].tolist() == ["reason", "reason", "code"] and df["cost_usd"].notna().all()
    bad = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps(good[0]), "{not json", json.dumps(good[1])])
    with pytest.raises(MalformedRecordError, match=r"bad\.jsonl:2: invalid JSON"):
        load_llmrouter(bad)
    out_of_range = {**good[0], "scores": {"m": 1.5}}
    with pytest.raises(MalformedRecordError, match=r"range\.jsonl:1: score for model 'm'"):
        load_llmrouter(_write_jsonl(tmp_path / "range.jsonl", [json.dumps(out_of_range)]))
    no_scores = {"prompt": "x", "task_name": "mbpp"}
    with pytest.raises(MalformedRecordError, match=r"missing\.jsonl:1: missing field 'scores'"):
        load_llmrouter(_write_jsonl(tmp_path / "missing.jsonl", [json.dumps(no_scores)]))


# --- the default data shipped in the package -------------------------------------------------


def test_shipped_default_equals_the_source_table(shared_data: Path, tmp_path: Path) -> None:
    """The compact copy gives the adapter the same long table as the full folder, row for row, and
    the rebuild reproduces it."""
    folder = shared_data / SOURCE_FOLDERS["llmrouter"]
    if not folder.is_dir():
        pytest.skip(f"{str(folder)!r} not found")
    full, shipped = load_llmrouter(folder), load_llmrouter(DEFAULT_FILE)
    pd.testing.assert_frame_equal(shipped, full)
    assert table_hash(shipped) == table_hash(full)
    assert check_default(folder) == []
    rebuilt = write_default(folder, dest=tmp_path)
    pd.testing.assert_frame_equal(pd.read_parquet(rebuilt), pd.read_parquet(DEFAULT_FILE))
    # the scored models' prices ride in the metadata, equal to the source's price table
    meta = json.loads(pq.read_schema(rebuilt).metadata[SHIPPED_PRICES_KEY])
    assert meta == compact_prices(folder) == shipped_llmrouter_prices()
    candidates = json.loads((folder / "llm_candidates.json").read_text())
    assert set(meta) == set(full["model"]) and meta["gemma-2-9b-it"]["input_price"] == float(
        candidates["gemma-2-9b-it"]["input_price"]
    )


def test_without_data_dir_llmrouter_and_its_prices_come_from_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ROUTER_ML_DATA_DIR", str(tmp_path / "nonexistent"))
    with caplog.at_level("INFO"):
        df = load_source("llmrouter")
    assert "reading the copy shipped in the package" in caplog.text
    n_prompts, n_models, n_rows = EXPECTED["llmrouter"]
    assert (df["prompt_id"].nunique(), df["model"].nunique(), len(df)) == (n_prompts, n_models, n_rows)
    assert (df["source"] == "llmrouter_ulab").all() and df["cost_usd"].gt(0).all()
    assert df.drop_duplicates("prompt_id")["source_task"].value_counts()["human_eval"] == 113
    # the pool's prices too: the llmrouter models from the prices shipped in the package, others NaN
    with caplog.at_level("WARNING"), pytest.warns(UserWarning, match=r"\['gpt-4o'\]: set ROUTER_ML_DATA_DIR"):
        prices = model_prices(["gemma-2-9b-it", "gpt-4o"]).set_index("model")
    assert "no price tables" in caplog.text
    assert prices.loc["gemma-2-9b-it", "input_per_mtok"] == pytest.approx(0.10)
    assert np.isnan(prices.loc["gpt-4o", "input_per_mtok"])


def test_without_data_dir_a_fetched_llmrouter_in_the_cache_comes_before_the_shipped_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_ML_DATA_DIR", str(tmp_path / "nonexistent"))
    monkeypatch.setenv("ROUTER_ML_CACHE_DIR", str(tmp_path / "cache"))
    built = tmp_path / "cache" / "data" / "llmrouter_ulab"
    built.mkdir(parents=True)
    record = {
        "prompt_id": "x",
        "prompt": "What is 2+2?",
        "task_name": "gsm8k",
        "scores": {"gemma-2-9b-it": 1.0},
    }
    _write_jsonl(built / "train.jsonl", [json.dumps(record)])
    (built / "llm_candidates.json").write_text(json.dumps(shipped_llmrouter_prices()))
    assert load_source("llmrouter")["prompt_id"].tolist() == ["llmrouter_ulab/x"]


def test_llmrouter_parquet_names_bad_rows_and_columns(tmp_path: Path) -> None:
    good = pd.DataFrame(
        {
            "prompt_id": ["a", "b"],
            "task_name": ["gsm8k", "mbpp"],
            "prompt": ["What is 2+2?", "Write a function."],
            "score/qwen2.5-7b-instruct": [1.0, 0.5],
            "score/gemma-2-9b-it": [0.0, np.nan],  # NaN = no score for that model
        }
    )
    good.to_parquet(tmp_path / "ok.parquet")
    df = load_llmrouter(tmp_path / "ok.parquet")
    assert len(df) == 3 and set(df["prompt_id"]) == {"llmrouter_ulab/a", "llmrouter_ulab/b"}
    good.assign(**{"score/gemma-2-9b-it": [0.0, 1.5]}).to_parquet(tmp_path / "range.parquet")
    with pytest.raises(MalformedRecordError, match=r"range\.parquet: row 2: score for model 'gemma-2-9b-it'"):
        load_llmrouter(tmp_path / "range.parquet")
    good.drop(columns=["task_name"]).to_parquet(tmp_path / "cols.parquet")
    with pytest.raises(MalformedRecordError, match=r"missing column\(s\) \['task_name'\]"):
        load_llmrouter(tmp_path / "cols.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(MalformedRecordError, match=r"junk\.parquet: not a readable parquet file"):
        load_llmrouter(tmp_path / "junk.parquet")


# --- schema rejections and parquet round trip --------------------------------------------------


def _tiny_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": ["p1", "p1", "p2"],
            "prompt": ["a", "a", "b"],
            "task": ["qa", "qa", "code"],
            "source_task": ["x", "x", "y"],
            "model": ["m1", "m2", "m1"],
            "score": [0.0, 1.0, 0.5],
        }
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.drop(columns="score"), r"missing required column\(s\) \['score'\]"),
        (
            lambda d: d.assign(score=[0.0, 1.2, 0.5]),
            r"score out of range \[0, 1\]: 1.2 for prompt_id 'p1', model 'm2'",
        ),
        (
            lambda d: d.assign(model=["m1", "m1", "m1"]),
            r"duplicate prompt x model: prompt_id 'p1', model 'm1'",
        ),
        (lambda d: d.assign(prompt=["a", "a", "  "]), r"empty prompt for prompt_id\(s\) \['p2'\]"),
        (lambda d: d.assign(task=["qa", "qa", "poetry"]), r"unknown task type\(s\) \['poetry'\]"),
    ],
)
def test_validate_table_rejections(mutate, message: str) -> None:
    validate_table(_tiny_table())
    with pytest.raises(RoutingTableError, match=message):
        validate_table(mutate(_tiny_table()))


def test_validate_table_rejects_unknown_model() -> None:
    with pytest.raises(RoutingTableError, match=r"unknown model\(s\) \['m2'\]; known models are \['m1'\]"):
        validate_table(_tiny_table(), known_models=["m1"])


def test_parquet_round_trip_keeps_extra_columns(tables: dict[str, pd.DataFrame], tmp_path: Path) -> None:
    df = tables["routerbench"]
    back = read_table(write_table(df, tmp_path / "rb.parquet"))
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


# --- prices --------------------------------------------------------------------------------------


def test_price_table_covers_every_mapped_model_and_data_set(tables: dict[str, pd.DataFrame]) -> None:
    prices = load_price_table()
    assert set(prices["model"]) == set(MODEL_PRICE_KEYS)
    assert (prices[["input_per_mtok", "output_per_mtok"]] > 0).all().all()
    gpt4 = prices.set_index("model").loc["gpt-4-1106-preview"]
    assert (gpt4["input_per_mtok"], gpt4["output_per_mtok"]) == pytest.approx((10.0, 30.0))
    all_models = set().union(*(set(t["model"]) for t in tables.values()))
    assert all_models - set(MODEL_PRICE_KEYS) == UNPRICED


def test_attach_costs_keeps_measured_and_warns_on_unknown(tables: dict[str, pd.DataFrame]) -> None:
    df = tables["routerbench"].head(50)
    pd.testing.assert_series_equal(attach_costs(df)["cost_usd"], df["cost_usd"])
    odd = df.drop(columns=["cost_usd", "output_tokens"]).assign(model="no-such-model")
    with pytest.warns(UserWarning, match=r"no price for model\(s\) \['no-such-model'\]"):
        out = attach_costs(odd)
    assert out["cost_usd"].isna().all() and (out["output_tokens"] == OUTPUT_TOKEN_PRIOR["qa"]).any()
    with pytest.warns(UserWarning, match="no-such-model"):
        assert model_prices(["no-such-model"])["input_per_mtok"].isna().all()
    assert estimate_tokens("abcde") == 2 and estimate_tokens("") == 0


# --- labelled prompt sets ---------------------------------------------------------------------


def test_shared_labelled_sets(shared_data: Path) -> None:
    wiz, mt = load_labelled("wizardlm"), load_labelled("mt_bench")
    assert len(wiz) == 218 and len(mt) == 80
    assert wiz.loc[wiz["source_task"] == "Code Debug", "task"].eq("code").all()
    assert mt.groupby("task").size().to_dict() == {
        "code": 10,
        "creative": 30,
        "qa": 10,
        "reason": 20,
        "summarize": 10,
    }
    with pytest.raises(KeyError, match="known sets"):
        load_labelled("dolly")


def test_project_labelled_files(tmp_path: Path) -> None:
    rows = [
        {"id": "c1", "prompt": "Is this spam?", "task": "classify"},
        {"id": "s1", "prompt": "Sum up:", "task": "summarize"},
    ]
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    df = load_labelled("project", path=tmp_path)
    assert df["prompt_id"].tolist() == ["project/c1", "project/s1"] and df["task"].tolist() == [
        "classify",
        "summarize",
    ]
    _write_jsonl(tmp_path / "b.jsonl", [json.dumps({"id": "x", "prompt": "p", "task": "poetry"})])
    with pytest.raises(LabelledDataError, match=r"b\.jsonl:1: unknown task 'poetry'"):
        load_labelled("project", path=tmp_path)
    _write_jsonl(tmp_path / "b.jsonl", [json.dumps({"id": "c1", "prompt": "p", "task": "qa"})])
    with pytest.raises(LabelledDataError, match=r"b\.jsonl:1: duplicate id 'c1'"):
        load_labelled("project", path=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no \*\.jsonl files"):
        load_labelled("project", path=tmp_path / "empty")


def test_repository_labelled_prompts_load_when_present() -> None:
    from router_ml.paths import project_data_dir

    if not list((project_data_dir() / "labelled_prompts").glob("*.jsonl")):
        pytest.skip("data/labelled_prompts/*.jsonl not written yet")
    df = load_labelled("project")
    assert df["prompt_id"].is_unique and set(df["task"]) <= set(TASK_TYPES)


def test_fresh_test_prompts_are_disjoint_from_the_training_set() -> None:
    fresh, project = load_labelled("fresh"), load_labelled("project")
    assert fresh["prompt_id"].is_unique and fresh["prompt_id"].str.startswith("fresh/").all()
    assert fresh["task"].value_counts().to_dict() == dict.fromkeys(TASK_TYPES, 40)
    assert not set(fresh["prompt"].map(normalize_text)) & set(project["prompt"].map(normalize_text))


def test_benchmark_task_labels_are_unique_texts(shared_data: Path) -> None:
    df = load_benchmark_task_labels(("llmrouter", "alpaca_eval"), max_per_source_task=50, seed=1)
    assert df["prompt"].map(normalize_text).is_unique
    assert df.groupby(["source", "source_task"]).size().max() <= 50
    assert set(df["task"]) == {"qa", "reason", "code", "creative"}


# --- splits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dup_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """llmrouter plus 300 of its prompts re-issued under new ids with case/whitespace changes."""
    base = tables["llmrouter"]
    ids = base["prompt_id"].drop_duplicates().sample(300, random_state=0)
    copy = base[base["prompt_id"].isin(ids)].copy()
    copy["prompt_id"] = copy["prompt_id"] + "-dup"
    copy["prompt"] = "  " + copy["prompt"].str.upper().str.replace(" ", "\n", n=1)
    return pd.concat([base, copy], ignore_index=True)


def _assert_disjoint(parts: list[pd.DataFrame]) -> None:
    ids = [set(p["prompt_id"]) for p in parts]
    texts = [set(normalize_series(p["prompt"])) for p in parts]
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert not ids[i] & ids[j] and not texts[i] & texts[j]


def test_split_prompts_is_grouped_stratified_and_seeded(dup_table: pd.DataFrame) -> None:
    parts = split_prompts(dup_table, test_size=0.2, val_size=0.1, seed=3)
    assert list(parts) == ["train", "val", "test"] and sum(map(len, parts.values())) == len(dup_table)
    _assert_disjoint(list(parts.values()))
    groups = dup_table.drop_duplicates("prompt_id").assign(g=lambda d: d["prompt"].map(normalize_text))
    share = (
        parts["test"]
        .drop_duplicates("prompt_id")
        .merge(groups[["prompt_id", "g"]])
        .groupby("task")["g"]
        .nunique()
    )
    total = groups.groupby("task")["g"].nunique()
    assert ((share / total) - 0.2).abs().max() < 0.01
    again = split_prompts(dup_table.sample(frac=1.0, random_state=9), test_size=0.2, val_size=0.1, seed=3)
    assert set(again["test"]["prompt_id"]) == set(parts["test"]["prompt_id"])  # seeded, row order irrelevant
    other = split_prompts(dup_table, test_size=0.2, val_size=0.1, seed=4)
    assert set(other["test"]["prompt_id"]) != set(parts["test"]["prompt_id"])
    assert set(split_prompts(dup_table, seed=3)) == {"train", "test"}
    with pytest.raises(ValueError, match="test_size"):
        split_prompts(dup_table, test_size=0.7, val_size=0.4)


def test_split_tasks_holds_out_exactly_the_named_tasks(dup_table: pd.DataFrame) -> None:
    parts = split_tasks(dup_table, ["gsm8k", "human_eval"])
    assert set(parts["test"]["source_task"]) == {"gsm8k", "human_eval"}
    assert not set(parts["train"]["source_task"]) & {"gsm8k", "human_eval"}
    assert len(parts["test"]) == dup_table["source_task"].isin(["gsm8k", "human_eval"]).sum()
    _assert_disjoint([parts["train"], parts["test"]])
    by_task = split_tasks(dup_table, ["creative"], by="task")
    assert set(by_task["test"]["task"]) == {"creative"}
    with pytest.raises(ValueError, match=r"held-out source_task value\(s\) \['poetry'\]"):
        split_tasks(dup_table, ["poetry"])


def test_kfold_prompts_partitions_groups(dup_table: pd.DataFrame) -> None:
    folds = list(kfold_prompts(dup_table, n_splits=4, seed=0))
    assert len(folds) == 4
    vals = [v for _, v in folds]
    _assert_disjoint(vals)
    assert sum(v["prompt_id"].nunique() for v in vals) == dup_table["prompt_id"].nunique()
    for train, val in folds:
        _assert_disjoint([train, val])
        assert len(train) + len(val) == len(dup_table)
    sizes = [v["prompt_id"].nunique() for v in vals]
    assert max(sizes) - min(sizes) < 0.05 * max(sizes)
