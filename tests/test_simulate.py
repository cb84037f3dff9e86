"""The seeded outcome simulator, the project's own code/reason/qa prompt files and the WizardLM skill map."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from router_ml.data.schema import validate_table
from router_ml.data.simulate import (
    SIMULATED_MODELS,
    SimulatedModel,
    simulate_labelled_prompts,
    simulate_outcomes,
)
from router_ml.data.taxonomy import TASK_TYPES, map_task
from router_ml.paths import project_data_dir

LABELLED_DIR = project_data_dir() / "labelled_prompts"
OWN_FILES = ("code", "reason", "qa")
API_OR_LARGE = {"claude-sonnet-4", "gpt-4o", "qwen2.5-32b-instruct"}

_SUBJECTS = [
    "a CSV of orders",
    "the quarterly report",
    "my landlord's email",
    "a Python list of user records",
    "two trains leaving Paris",
    "the French Revolution",
    "a product launch",
    "a customer complaint about late delivery",
    "a 3x3 magic square",
    "the Krebs cycle",
]
_TEMPLATES = {
    "classify": "Label the sentiment of this message about {s} as positive, negative or neutral.",
    "summarize": "Summarise the following text about {s} in three bullet points.",
    "code": "Write a {lang} function that parses {s} and returns the rows sorted by date.",
    "reason": "A puzzle about {s}: work out step by step how many ways there are to order them.",
    "creative": "Write a short, funny poem about {s} for a birthday card.",
    "qa": "What is the history behind {s}, and why does it matter today?",
}
_LANGS = ["Python", "Go", "Rust", "SQL", "TypeScript", "Java", "bash", "C++"]


def make_prompts(n_per_task: int, tasks=TASK_TYPES, padding: int = 0) -> pd.DataFrame:
    """A prompt frame with ``n_per_task`` distinct prompts per task (``padding`` extra words each)."""
    rows = []
    for task in tasks:
        for i in range(n_per_task):
            text = _TEMPLATES[task].format(s=_SUBJECTS[i % len(_SUBJECTS)], lang=_LANGS[i % len(_LANGS)])
            text += f" (case {i})" + " Please be thorough and precise." * (padding + i % 5)
            rows.append({"prompt_id": f"{task}-{i:04d}", "prompt": text, "task": task})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return make_prompts(5)


def test_table_passes_schema_with_one_row_per_prompt_and_model(small):
    table = simulate_outcomes(small, seed=0)
    validate_table(table, known_models=SIMULATED_MODELS)
    assert len(table) == len(small) * len(SIMULATED_MODELS)
    assert set(table["model"]) == set(SIMULATED_MODELS)
    assert not table.duplicated(["prompt_id", "model"]).any()
    assert (table["source"] == "simulated").all()
    assert (table["source_task"] == table["task"]).all()
    assert set(table["score"].unique()) <= {0.0, 1.0}
    for col in ("input_tokens", "output_tokens", "cost_usd", "latency_s"):
        assert table[col].notna().all(), col


def test_same_seed_same_table_and_row_order_does_not_matter(small):
    a = simulate_outcomes(small, seed=7)
    pd.testing.assert_frame_equal(a, simulate_outcomes(small, seed=7))
    shuffled = small.sample(frac=1.0, random_state=1).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, simulate_outcomes(shuffled, seed=7))


def test_different_seeds_differ():
    prompts = make_prompts(20)
    a, b = simulate_outcomes(prompts, seed=0), simulate_outcomes(prompts, seed=1)
    assert (a["score"] != b["score"]).mean() > 0.05
    assert not np.array_equal(a["output_tokens"], b["output_tokens"])
    # the prompt side (ids, texts, input tokens) is the same
    pd.testing.assert_series_equal(a["input_tokens"], b["input_tokens"])


def test_tokens_costs_and_latency_follow_the_price_table(small):
    table = simulate_outcomes(small, seed=3)
    expected_in = small.set_index("prompt_id")["prompt"].str.len().map(lambda c: math.ceil(c / 4))
    assert (table["input_tokens"].to_numpy() == table["prompt_id"].map(expected_in).to_numpy()).all()
    assert (table["output_tokens"] >= 1).all()
    assert (table["cost_usd"] > 0).all()
    spec = table["model"].map(SIMULATED_MODELS)
    cost = (
        table["input_tokens"] * spec.map(lambda s: s.input_price_per_m)
        + table["output_tokens"] * spec.map(lambda s: s.output_price_per_m)
    ) / 1e6
    np.testing.assert_allclose(table["cost_usd"], cost, rtol=1e-12)
    latency = spec.map(lambda s: s.first_token_s) + table["output_tokens"] / spec.map(
        lambda s: s.tokens_per_s
    )
    np.testing.assert_allclose(table["latency_s"], latency, rtol=1e-12)
    mean_cost = table.groupby("model")["cost_usd"].mean()
    local = [m for m, s in SIMULATED_MODELS.items() if s.local]
    assert mean_cost[local].max() < mean_cost["gpt-4o-mini"] < mean_cost["gpt-4o"]
    assert mean_cost["gpt-4o"] < mean_cost["claude-sonnet-4"]
    # output length follows the per-task prior: a label is far shorter than an essay
    by_task = table.groupby("task")["output_tokens"].median()
    assert by_task["classify"] * 5 < by_task["creative"]


def test_skill_structure_shows_in_outcomes():
    """Over 300 prompts per task and 3 seeds, the simulated outcomes reflect the article's table."""
    prompts = make_prompts(300)
    means = (
        sum(
            simulate_outcomes(prompts, seed=s).pivot_table(index="task", columns="model", values="score")
            for s in range(3)
        )
        / 3
    )
    assert means.loc["code"].idxmax() == "qwen2.5-coder-7b-instruct"
    assert means.loc["creative"].idxmax() in API_OR_LARGE
    assert means.loc["reason"].idxmax() in API_OR_LARGE
    small_model = "qwen2.5-1.5b-instruct"
    assert means.loc["classify"].max() - means.loc["classify", small_model] < 0.1  # fine at classify
    assert means.loc["creative"].max() - means.loc["creative", small_model] > 0.4  # not at essays
    assert means.loc["code", "qwen2.5-coder-7b-instruct"] > means.loc["code", "qwen2.5-7b-instruct"] + 0.2


def test_longer_prompts_are_harder():
    short = make_prompts(200, tasks=("qa",))
    long = make_prompts(200, tasks=("qa",), padding=60)
    long["prompt_id"] = "long-" + long["prompt_id"]
    table = simulate_outcomes(pd.concat([short, long], ignore_index=True), seed=0)
    is_long = table["prompt_id"].str.startswith("long-")
    assert table.loc[is_long, "score"].mean() < table.loc[~is_long, "score"].mean() - 0.05


def test_custom_pool_given_as_plain_dicts(small):
    skill = {t: 0.0 for t in TASK_TYPES}
    pool = {
        "tiny": {"skill": {**skill, "classify": 3.0}, "input_price_per_m": 0.01, "output_price_per_m": 0.02,
                 "first_token_s": 0.05, "tokens_per_s": 100.0, "local": True},
        "big": SimulatedModel({t: 2.0 for t in TASK_TYPES}, 1.0, 4.0, 0.4, 50.0),
    }  # fmt: skip
    table = simulate_outcomes(small, seed=0, models=pool)
    assert list(table["model"].unique()) == ["tiny", "big"]
    assert len(table) == 2 * len(small)


def test_source_task_is_kept_when_given(small):
    prompts = small.assign(source_task="my-benchmark")
    table = simulate_outcomes(prompts, seed=0)
    assert (table["source_task"] == "my-benchmark").all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.drop(columns="task"), "lacks column"),
        (lambda df: df.assign(task="translate"), "unknown task type"),
        (lambda df: pd.concat([df, df.head(1)]), "duplicate prompt_id"),
        (lambda df: df.head(0), "no rows"),
    ],
)
def test_bad_prompt_frames_are_rejected_with_a_clear_message(small, change, message):
    with pytest.raises(ValueError, match=message):
        simulate_outcomes(change(small), seed=0)


def test_bad_model_pools_are_rejected(small):
    with pytest.raises(ValueError, match="has no skill for task"):
        simulate_outcomes(small, models={"m": SimulatedModel({"qa": 1.0}, 0.1, 0.1, 0.1, 10.0)})
    with pytest.raises(ValueError, match="empty"):
        simulate_outcomes(small, models={})
    with pytest.raises(ValueError, match="bad spec"):
        simulate_outcomes(small, models={"m": {"skill": {}, "price": 1}})


def _read_jsonl(task: str) -> list[dict]:
    path = LABELLED_DIR / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", OWN_FILES)
def test_own_prompt_files_are_valid_and_varied(task):
    rows = _read_jsonl(task)
    assert len(rows) >= 80
    assert all(set(r) == {"id", "prompt", "task"} for r in rows)
    assert [r["id"] for r in rows] == [f"{task}-{i:03d}" for i in range(1, len(rows) + 1)]
    assert {r["task"] for r in rows} == {task}
    normalized = Counter(" ".join(r["prompt"].lower().split()) for r in rows)
    assert max(normalized.values()) == 1, "duplicate prompt text"
    words = np.array([len(r["prompt"].split()) for r in rows])
    assert words.min() <= 8 and words.max() >= 180
    assert (words >= 100).mean() >= 0.2, "about a quarter of the prompts should be long"
    assert sum(not r["prompt"].isascii() for r in rows) >= 3, "a few non-English prompts"


def test_simulate_labelled_prompts_runs_on_the_project_files():
    table = simulate_labelled_prompts(seed=0)
    n_prompts = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in LABELLED_DIR.glob("*.jsonl"))
    assert table["prompt_id"].nunique() == n_prompts
    assert len(table) == n_prompts * len(SIMULATED_MODELS)
    assert set(OWN_FILES) <= set(table["task"])
    assert table["prompt_id"].str.startswith("project/").all()
    pd.testing.assert_frame_equal(table, simulate_labelled_prompts(seed=0))


def test_wizardlm_skills_all_map_and_corrected_entries(shared_data):
    path = shared_data / "task_labelled_prompts" / "wizardlm_testset.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    skills = {json.loads(line)["Skill"] for line in path.read_text(encoding="utf-8").splitlines()}
    mapped = {s: map_task("wizardlm", s) for s in skills}
    assert set(mapped.values()) <= set(TASK_TYPES)
    # these skills are named for a topic or a form, but their prompts ask for something else
    assert mapped["Complex Format"] == "code"
    assert mapped["Counterfactual"] == "creative"
    assert mapped["Physics"] == "reason"
