"""A collected store is a data set: score it in place, load it as a routing table, and carry its
measured prices, output lengths and latency into the decision layer of a checkpoint trained on it.

The store is built with the collection harness's own :class:`AnswerStore` and scored with the real
math / choice / QA scorers; the full-tier test trains a router on it with ``experiments.train``
and routes with the checkpoint.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from router_ml.collect.prompts import Prompt
from router_ml.collect.scoring import score_store
from router_ml.collect.store import AnswerStore, CallRecord
from router_ml.data.adapters import load_source
from router_ml.data.adapters.collected import load_collected
from router_ml.data.store_file import StoreFileError
from router_ml.data.taxonomy import UnknownTaskError
from router_ml.decision.measured import MeasuredFigures
from router_ml.scoring.math_answer import MathScorer
from router_ml.scoring.registry import build_scorer

# two models with known prices ($/1M in, out), time to first token and decode speed
POOL = {
    "small-1b": {"prices": (0.1, 0.4), "ttft": 0.05, "tps": 200.0, "out": 40},
    "big-70b": {"prices": (2.0, 8.0), "ttft": 0.40, "tps": 50.0, "out": 120},
}


def _prompts(n_math: int = 12, n_choice: int = 12, n_qa: int = 6) -> list[Prompt]:
    out = []
    for i in range(n_math):
        out.append(Prompt(f"m{i}", f"What is {i + 2} times {i + 3}? Show your work.", reference=str((i + 2) * (i + 3)),
                          task="gsm8k", source="test"))  # fmt: skip
    for i in range(n_choice):
        q = f"Question {i}: which planet is known as the red planet?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn"
        out.append(Prompt(f"c{i}", q, reference="B", task="mmlu_astronomy", source="test"))
    for i in range(n_qa):
        out.append(Prompt(f"q{i}", f"Who wrote the play Hamlet? (variant {i})", reference="William Shakespeare",
                          task="trivia_qa", source="test"))  # fmt: skip
    return out


def _answer(p: Prompt, model: str, i: int) -> str:
    """``big-70b`` is right everywhere; ``small-1b`` gets every third math and choice prompt wrong."""
    wrong = model == "small-1b" and i % 3 == 0
    if p.task == "gsm8k":
        value = int(p.reference or 7) + (1 if wrong else 0)
        return f"Multiplying gives {value}.\n#### {value}"
    if p.task.startswith("mmlu"):
        return "The answer is (C)." if wrong else "The answer is (B)."
    if p.task == "trivia_qa":
        return "Answer: William Shakespeare" if model == "big-70b" else "Answer: Christopher Marlowe"
    return "Rain falls softly."


def build_store(path: Path, prompts: list[Prompt] | None = None) -> Path:
    """A store of ``prompts`` x POOL with measured tokens, catalog-priced costs and timings."""
    prompts = prompts or _prompts()
    rng = np.random.default_rng(0)
    with AnswerStore(path) as store:
        store.add_prompts(prompts)
        for model, m in POOL.items():
            pin, pout = m["prices"]
            for i, p in enumerate(prompts):
                tok_in = int(20 + len(p.prompt) // 4 + rng.integers(0, 30))
                tok_out = int(m["out"] + (10 if p.task == "gsm8k" else 0) + rng.integers(-5, 6))
                ttft = m["ttft"] * float(rng.uniform(0.9, 1.1))
                store.record(
                    CallRecord(
                        p.prompt_id, model, ok=True, started_at=1.0, finished_at=2.0,
                        answer=_answer(p, model, i), input_tokens=tok_in, output_tokens=tok_out,
                        cost_usd=(tok_in * pin + tok_out * pout) / 1e6, ttft_s=ttft,
                        latency_s=ttft + tok_out / (m["tps"] * float(rng.uniform(0.95, 1.05))),
                    )
                )  # fmt: skip
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return build_store(tmp_path / "answers.sqlite")


def test_score_store_writes_verdicts_once_per_scorer_version(store: Path) -> None:
    with AnswerStore(store) as db:
        first = score_store(db, build_scorer, progress=False)
        assert first["answers"] == 60 and first["scored"] == 60 and first["failed"] == 0
        assert first["by_scorer"]["math"]["mean_score"] == pytest.approx((12 + 8) / 24)
        assert first["by_scorer"]["choice"]["mean_score"] == pytest.approx((12 + 8) / 24)
        assert first["by_scorer"]["qa"]["rows"] == 12
        scores = db.scores()
        assert len(scores) == 60 and set(scores["version"]) == {"1"}
        assert json.loads(scores["detail"].iloc[0])["extracted"] is not None
        # a rerun adds nothing
        again = score_store(db, build_scorer, progress=False)
        assert again["scored"] == 0 and again["already_scored"] == 60 and len(db.scores()) == 60

        class MathV2(MathScorer):  # a new version of a real scorer
            version = "2"

        newer = score_store(db, lambda n: MathV2() if n == "math" else build_scorer(n), progress=False)
        assert newer["scored"] == 24 and newer["by_scorer"]["math"]["version"] == "2"
        assert len(db.scores()) == 84


def test_errors_are_rows_and_unscorable_tasks_are_counted(tmp_path: Path) -> None:
    prompts = [*_prompts(2, 0, 0), Prompt("noref", "What is 3 + 4?", task="gsm8k"),
               Prompt("poem", "Write a poem about rain.", task="poetry")]  # fmt: skip
    path = build_store(tmp_path / "s.sqlite", prompts)
    with AnswerStore(path) as db:
        db.record(
            CallRecord("m0", "small-1b", ok=False, started_at=3.0, finished_at=3.5, error_kind="timeout")
        )
        summary = score_store(db, build_scorer, progress=False)
        assert summary["no_scorer"] == {"poetry": 2}
        assert summary["failed"] == 2  # the prompt without a reference, on both models
        failed = db.scores().query("prompt_id == 'noref'")
        assert failed["score"].isna().all() and failed["error"].str.contains("reference").all()
        # failed verdicts are retried, not skipped, by the next run
        assert score_store(db, build_scorer, progress=False)["scored"] == 2


def test_cli_scores_a_store(store: Path, tmp_path: Path, capsys) -> None:
    from router_ml.cli import main

    assert main(["score", "--store", str(store), "--cache", str(tmp_path / "cache.sqlite")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == 60 and set(summary["by_scorer"]) == {"math", "choice", "qa"}
    assert main(["score", "--store", str(tmp_path / "nope.sqlite")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["score"]) == 2


def test_a_scored_store_loads_as_a_routing_table(store: Path, caplog) -> None:
    with pytest.raises(StoreFileError, match="no scored answers"):
        load_collected(store)
    with AnswerStore(store) as db:
        score_store(db, build_scorer, progress=False)
    table = load_source("collected", path=store)
    assert len(table) == 60 and table["prompt_id"].nunique() == 30
    assert dict(table.groupby("task")["prompt_id"].nunique()) == {"qa": 18, "reason": 12}
    assert set(table["source_task"]) == {"gsm8k", "mmlu_astronomy", "trivia_qa"}
    assert table[["input_tokens", "output_tokens", "cost_usd", "latency_s", "ttft_s"]].notna().all().all()
    big = table[table["model"] == "big-70b"]
    assert big["score"].mean() == pytest.approx(1.0)
    assert set(table["scorer_version"]) == {"1"}
    # the latest version wins by default; a missing verdict drops the row, with a count in the log
    with AnswerStore(store) as db:

        class MathV2(MathScorer):
            version = "2"

        score_store(db, lambda n: MathV2(), scorer="math", progress=False)
        db.add_scores([{"prompt_id": "m1", "model": "big-70b", "scorer": "math", "version": "2", "score": None,
                        "error": "boom"}])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        latest = load_collected(store)
    assert "1 of 60 answers dropped" in caplog.text
    assert len(latest) == 59
    assert set(latest.loc[latest["scorer"] == "math", "scorer_version"]) == {"2"}
    assert set(latest.loc[latest["scorer"] == "choice", "scorer_version"]) == {"1"}
    pinned = load_collected(store, scorer="math", scorer_version="1")
    assert len(pinned) == 24 and set(pinned["source_task"]) == {"gsm8k"}  # math@1 scored the math rows only


def test_clear_errors_for_what_is_not_a_usable_store(tmp_path: Path) -> None:
    with pytest.raises(StoreFileError, match="not found"):
        load_collected(tmp_path / "missing.sqlite")
    with pytest.raises(StoreFileError, match="needs the store"):
        load_collected(None)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreFileError, match="not a collection store"):
        load_collected(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreFileError, match="cannot be read"):
        load_collected(junk)
    empty = tmp_path / "empty.sqlite"
    AnswerStore(empty).close()
    with pytest.raises(StoreFileError, match="no answers"):
        load_collected(empty)
    # a task that maps onto no task type is an error naming it, unless a default is given
    path = build_store(
        tmp_path / "odd.sqlite", [Prompt("x", "Rate this: 2+2=4?", reference="4", task="odd-task")]
    )
    with AnswerStore(path) as db:
        score_store(db, build_scorer, scorer="math", progress=False)
    with pytest.raises(UnknownTaskError, match="odd-task"):
        load_collected(path, scorer="math")
    assert set(load_collected(path, scorer="math", default_task="reason")["task"]) == {"reason"}


def test_measured_figures_give_back_the_pool_and_feed_the_decision_layer(store: Path) -> None:
    from router_ml.decision.policies import build_policy

    with AnswerStore(store) as db:
        score_store(db, build_scorer, progress=False)
        calls = db.calls()
    table = load_collected(store)
    fig = MeasuredFigures.from_config(json.loads(json.dumps(MeasuredFigures.fit(table).to_config())))
    for model, m in POOL.items():
        got, mine = fig.models[model], calls[calls["model"] == model]
        assert (got["input_per_mtok"], got["output_per_mtok"]) == pytest.approx(m["prices"], rel=1e-6)
        assert got["ttft_s"] == pytest.approx(mine["ttft_s"].median())
        speed = mine["output_tokens"] / (mine["latency_s"] - mine["ttft_s"])
        assert got["tokens_per_s"] == pytest.approx(speed.median())
    # the decision layer prices and times a decision from these figures
    layer = fig.decision_layer(build_policy({"name": "utility"}), list(POOL))
    prompt = "What is 12 times 13?"
    q = np.array([[0.5, 0.9]])
    est = layer.estimates([prompt], q, list(POOL), ["reason"])
    in_tok = layer.cost_model.count_input_tokens([prompt])[0]
    for j, model in enumerate(POOL):
        mine = table[(table["model"] == model) & (table["task"] == "reason")]
        out = mine["output_tokens"].median()
        f = fig.models[model]
        assert est.cost[0, j] == pytest.approx(
            (in_tok[j] * f["input_per_mtok"] + out * f["output_per_mtok"]) / 1e6
        )
        assert est.ttft[0, j] == pytest.approx(f["ttft_s"])
        assert est.latency[0, j] == pytest.approx(f["ttft_s"] + out / f["tokens_per_s"])
    # a pool's own latency figures win over the measured ones; unset ones are filled
    from router_ml.decision.spec import ModelPool, ModelSpec

    given = ModelPool([ModelSpec("small-1b", input_per_mtok=1.0, output_per_mtok=1.0, ttft_s=9.0),
                       ModelSpec("big-70b", input_per_mtok=1.0, output_per_mtok=1.0)])  # fmt: skip
    filled = fig.fill_latency(given)
    assert filled.get("small-1b").ttft_s == 9.0
    assert filled.get("small-1b").tokens_per_s == fig.models["small-1b"]["tokens_per_s"]
    assert filled.get("big-70b").ttft_s == fig.models["big-70b"]["ttft_s"]
    assert filled.input_price.tolist() == [1.0, 1.0]  # prices stay the pool's


def test_train_on_a_collected_store_and_route_with_its_measured_figures(tmp_path, embedding_cache, capsys):
    """Full tier: collect -> score -> ``experiments.train data=collected`` -> the checkpoint routes
    (``router-ml route --policy``) and serves with the store's measured prices, lengths and latency."""
    import subprocess
    import sys

    from router_ml.backends.catalog import Catalog
    from router_ml.cli import main
    from router_ml.router import LearnedRouter
    from router_ml.serving.engine import RoutingEngine
    from router_ml.serving.engine_support import load_policy_configs

    root = Path(__file__).resolve().parent.parent
    store = build_store(tmp_path / "answers.sqlite", _prompts(24, 24, 12))
    assert main(["score", "--store", str(store), "--cache", ""]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "data=collected", f"data.path={store}", "predictor=linear",
         "calibrator=temperature", "calibrator.folds=3", f"hydra.run.dir={run}"],
        cwd=root, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/n_prompts"] >= 10 and 0 <= metrics["test/quality"] <= 1
    router = LearnedRouter.from_pretrained(run / "checkpoint")
    assert router.models == sorted(POOL)
    assert main(["info", str(run / "checkpoint")]) == 0
    info = json.loads(capsys.readouterr().out)["measured"]
    assert set(info["models"]) == set(POOL) and "collected" in info["source"]

    # what the store measured, worked out here from its calls
    with AnswerStore(store) as db:
        calls = db.calls()
    table = load_collected(store)
    prompt = "What is 21 times 34? Show your work."
    assert main(["route", "--ckpt", str(run / "checkpoint"), "--policy", "utility", prompt]) == 0
    decision = json.loads(capsys.readouterr().out)
    model, task = decision["model"], decision["task"]
    mine = calls[calls["model"] == model]
    ttft = mine["ttft_s"].median()
    speed = (mine["output_tokens"] / (mine["latency_s"] - mine["ttft_s"])).median()
    lengths = table[(table["model"] == model) & (table["task"] == task)]["output_tokens"]
    assert len(lengths) >= 5, f"the router predicted task {task!r}, which the store has no calls of"
    out = lengths.median()
    pin, pout = POOL[model]["prices"]
    from router_ml.decision.costs import build_token_counter

    tok_in = build_token_counter(None).count([prompt])[0]
    assert decision["expected_ttft_s"] == pytest.approx(ttft)
    assert decision["expected_latency_s"] == pytest.approx(ttft + out / speed)
    assert decision["expected_cost_usd"] == pytest.approx((tok_in * pin + out * pout) / 1e6, rel=1e-6)

    # the proxy: a catalog without latency figures takes the measured ones and the output lengths
    entries = [{"name": m, "kind": "api", "base_url": "http://127.0.0.1:9/v1", "tokenizer": "approx",
                "prices": {"input_per_mtok": p["prices"][0], "output_per_mtok": p["prices"][1]}}
               for m, p in POOL.items()]  # fmt: skip
    engine = RoutingEngine(router, Catalog.from_entries({"backends": entries}), load_policy_configs())
    snap = engine.latency_model.snapshot().set_index("model")
    assert snap.loc[model, "ttft_s"] == pytest.approx(ttft)
    assert snap.loc[model, "tokens_per_s"] == pytest.approx(speed)
    expected = engine.cost_model.output_model.predict([model], [task])[0, 0]
    assert expected == pytest.approx(out)
    import asyncio

    asyncio.run(engine.aclose())
