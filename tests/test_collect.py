"""Collection (issue 14): prompt files, the append-only store, pacing and the spend cap, the runner
against the project's loopback OpenAI server, the config and CLI; kill -9 resume (full tier)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from router_ml.backends.catalog import Catalog
from router_ml.backends.prompt_tokens import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE
from router_ml.collect import runner
from router_ml.collect.pacing import (
    BackendLimit,
    LimitConfigError,
    SpendCap,
    backend_limits,
    cost_bound,
    parse_rate,
)
from router_ml.collect.prompts import Prompt, PromptFileError, prompt_id_for, read_prompts
from router_ml.collect.runner import RequestSettings, collect, collect_from_config
from router_ml.collect.store import AnswerStore, CallRecord, StoreError, read_store
from router_ml.decision.costs import build_token_counter
from router_ml.decision.spec import ModelSpec
from tests.fakes.loopback import Fault, LoopbackThread

ROOT = Path(__file__).resolve().parent.parent
PRICES = {"input_per_mtok": 1.0, "output_per_mtok": 4.0}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(prompt_id=f"p{i}", prompt=f"question number {i}") for i in range(n)]


def _catalog(url: str, names=("a", "b"), **extra) -> Catalog:
    entry = {
        "kind": "api",
        "base_url": url,
        "prices": PRICES,
        "tokenizer": "approx",
        "first_token_timeout_s": 5,
    }
    return Catalog.from_entries({"backends": [{"name": n, **entry, **extra} for n in names]})


@pytest.fixture
def loop():
    with LoopbackThread() as srv:
        yield srv


# ------------------------------------------------------------------------------------ prompts
def test_prompt_file_fields_ids_and_duplicates(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 7 * 8?", "reference": "56", "task": "math"},
            {"id": 12, "prompt": "Write add(a, b)", "tests": ["assert add(1, 2) == 3"]},
            "",
            {"prompt": "What is 7 * 8?"},  # the same text again: the same hash id, kept once
            {"id": "c", "prompt": "Say hi", "tests": "assert True"},
        ],
    )
    got = read_prompts(path)
    assert [p.prompt_id for p in got] == [prompt_id_for("What is 7 * 8?"), "12", "c"]
    assert got[0].reference == "56" and got[0].task == "math" and got[0].source == "p.jsonl"
    assert got[1].tests == ("assert add(1, 2) == 3",) and got[2].tests == "assert True"
    assert got[1].tests_json() == '["assert add(1, 2) == 3"]'
    assert read_prompts(path) == got  # stable across reads
    assert prompt_id_for("What is 7 * 8?") != prompt_id_for("What is 7 * 9?")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"reference": "x"}, "p.jsonl:2: field 'prompt' is missing"),
        ({"prompt": "  "}, "p.jsonl:2: field 'prompt' = '  ' must be a non-empty string"),
        ({"prompt": 3}, "p.jsonl:2: field 'prompt' = 3 must be a non-empty string"),
        ({"prompt": "q", "id": 1.5}, "p.jsonl:2: field 'id' = 1.5 must be"),
        ({"prompt": "q", "id": True}, "p.jsonl:2: field 'id' = True must be"),
        ({"prompt": "q", "tests": [1, 2]}, "p.jsonl:2: field 'tests' = [1, 2] must be a string or a list"),
        ({"prompt": "q", "reference": 56}, "p.jsonl:2: field 'reference' = 56 must be a string"),
        ({"prompt": "q", "answer": "x"}, "p.jsonl:2: unknown field(s) ['answer']; allowed fields"),
        (["q"], "p.jsonl:2: expected a JSON object"),
        ('{"prompt": "q",', "p.jsonl:2: invalid JSON"),
        ({"id": "a", "prompt": "other text"}, "p.jsonl:2: field 'id' = 'a' is already used by"),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "first"}, line])
    with pytest.raises(PromptFileError) as err:
        read_prompts(path)
    assert message in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_parquet_prompts_and_their_errors(tmp_path):
    df = pd.DataFrame(
        {"id": ["x", None], "prompt": ["one", "two"], "tests": [["assert 1"], None], "task": [None, "qa"]}
    )
    df.to_parquet(tmp_path / "p.parquet")
    got = read_prompts(tmp_path / "p.parquet")
    assert [p.prompt_id for p in got] == ["x", prompt_id_for("two")]
    assert got[0].tests == ("assert 1",) and got[0].task is None and got[1].task == "qa"
    pd.DataFrame({"prompt": ["ok", ""]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(PromptFileError, match=r"bad.parquet: row 2: field 'prompt'"):
        read_prompts(tmp_path / "bad.parquet")
    for name, what in (("p.csv", "unknown prompt file type"), ("none.jsonl", "prompt file not found")):
        (tmp_path / "p.csv").write_text("prompt\nq\n")
        with pytest.raises(PromptFileError, match=what):
            read_prompts(tmp_path / name)
    _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(PromptFileError, match="no prompts"):
        read_prompts(tmp_path / "empty.jsonl")


# -------------------------------------------------------------------------------------- store
def _call(pid: str, model: str, ok: bool = True, **kw) -> CallRecord:
    now = time.time()
    if ok:
        kw.setdefault("answer", f"answer to {pid}")
    else:
        kw.setdefault("error_kind", "BackendTimeout")
    return CallRecord(prompt_id=pid, model=model, ok=ok, started_at=now, finished_at=now, **kw)


def test_store_keeps_one_answer_per_pair_and_every_error(tmp_path):
    with AnswerStore(tmp_path / "s.sqlite") as store:
        assert store.add_prompts(_prompts(3)) == 3
        assert store.add_prompts(_prompts(4)) == 1  # only the new prompt
        assert store.record(_call("p0", "a", ok=False, error_message="first"))
        assert store.record(_call("p0", "a", ok=False, error_message="second"))
        assert store.answered() == set()
        assert store.record(_call("p0", "a", input_tokens=5, cost_usd=0.25))
        assert not store.record(_call("p0", "a", answer="a second answer"))  # refused, not stored
        assert store.record(_call("p1", "a", ok=False, error_message="only error"))
        assert store.record(_call("p1", "b"))
        assert store.answered() == {("p0", "a"), ("p1", "b")}
        assert store.answered(["a"]) == {("p0", "a")}
        assert len(store.calls()) == 5
        with pytest.raises(StoreError, match=r"'p0' .* different text"):
            store.add_prompts([Prompt(prompt_id="p0", prompt="changed", source="f.jsonl")])
        with pytest.raises(StoreError, match="cannot record 'nope'"):
            store.record(_call("nope", "a", ok=True, answer=None))  # an answer needs its text
    table = read_store(tmp_path / "s.sqlite")
    by_pair = {(r.prompt_id, r.model): r for r in table.itertuples()}
    assert set(by_pair) == {("p0", "a"), ("p1", "a"), ("p1", "b")}
    assert by_pair["p0", "a"].ok == 1 and by_pair["p0", "a"].answer == "answer to p0"
    assert by_pair["p0", "a"].prompt == "question number 0" and by_pair["p0", "a"].cost_usd == 0.25
    assert by_pair["p1", "a"].ok == 0 and by_pair["p1", "a"].error_message == "only error"


def test_store_refuses_other_files_and_has_a_scores_table(tmp_path):
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="not a collection store"):
        AnswerStore(other)
    with pytest.raises(StoreError, match="not found"):
        read_store(tmp_path / "missing.sqlite")
    with pytest.raises(StoreError, match="synchronous"):
        AnswerStore(tmp_path / "s.sqlite", synchronous="OFF")
    AnswerStore(tmp_path / "s.sqlite").close()
    db = sqlite3.connect(tmp_path / "s.sqlite")
    cols = [r[1] for r in db.execute("PRAGMA table_info(scores)")]
    assert cols[:4] == ["prompt_id", "model", "scorer", "version"]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


# ------------------------------------------------------------------------------------- pacing
def test_rates_and_limits():
    assert parse_rate(None, "w") is None
    assert parse_rate(5, "w") == 5.0
    assert parse_rate("600/min", "w") == 10.0
    assert parse_rate("7200 / h", "w") == 2.0
    assert parse_rate("2.5/s", "w") == 2.5
    for bad in ("fast", "10/day", 0, -1, True, "0/s"):
        with pytest.raises(LimitConfigError, match="w: field 'rate'"):
            parse_rate(bad, "w")
    cfg = {"concurrency": 4, "rate": "60/min", "limits": {"b": {"concurrency": 1}, "c": {"rate": 2}}}
    got = backend_limits(["a", "b"], cfg)
    assert got == {"a": BackendLimit(4, 1.0), "b": BackendLimit(1, 1.0)}
    assert backend_limits(["a"], {}) == {"a": BackendLimit(8, None)}
    with pytest.raises(LimitConfigError, match=r"limits.b: field 'concurrency' = 0"):
        backend_limits(["a", "b"], {"limits": {"b": {"concurrency": 0}}})
    with pytest.raises(LimitConfigError, match=r"limits.b: unknown field\(s\) \['rps'\]"):
        backend_limits(["a"], {"limits": {"b": {"rps": 3}}})


def test_cost_bound_is_bytes_plus_template_times_price_plus_max_tokens():
    spec = ModelSpec(name="m", input_per_mtok=2.0, output_per_mtok=8.0, context_window=1000)
    usd, tin, tout = cost_bound(spec, prompt_bytes=100, max_tokens=50, template_tokens=20)
    assert (tin, tout) == (120, 50) and usd == pytest.approx((120 * 2.0 + 50 * 8.0) / 1e6)
    assert cost_bound(spec, prompt_bytes=5000, max_tokens=50)[1] == 1000  # at most the context window
    text = "naïve café 東京 " * 20  # multi-byte text: every tokenizer spends at least a byte per token
    assert build_token_counter("approx").count([text])[0] <= len(text.encode())


def test_spend_cap_reserves_waits_settles_and_stops():
    async def scenario():
        cap = SpendCap(1.0)
        assert await cap.reserve(0.4) and await cap.reserve(0.4)
        waiting = asyncio.ensure_future(cap.reserve(0.4))  # 1.2 > 1.0 while both are in flight
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await cap.settle(0.4, 0.1)  # the bill was below its bound: room for the third
        assert await asyncio.wait_for(waiting, 1) is True
        assert cap.spent == pytest.approx(0.1) and cap.reserved == pytest.approx(0.8)
        await cap.settle(0.4, 0.4)
        await cap.settle(0.4, 0.45)  # a bound that did not hold is counted
        assert cap.overruns == 1 and cap.in_flight == 0
        assert not await cap.reserve(0.5)  # 0.95 + 0.5 > 1 with nothing in flight: reached
        assert cap.reached and not await cap.reserve(0.01)  # and nothing launches after that
        free = SpendCap(None)
        assert await free.reserve(1e9)

    asyncio.run(scenario())
    with pytest.raises(LimitConfigError, match="spend_cap_usd"):
        SpendCap(-1.0)


# ------------------------------------------------------------------------------------- runner
def test_collects_every_pair_with_tokens_cost_and_timing(loop, tmp_path):
    catalog = _catalog(loop.base_url)
    summary = collect(_prompts(5), catalog, tmp_path / "s.sqlite", progress=False)
    assert summary["calls"] == summary["answers"] == 10 and summary["left"] == 0
    assert summary["stop_reason"] == "done"
    table = read_store(tmp_path / "s.sqlite")
    assert len(table) == 10 and table["ok"].all()
    assert table["answer"].str.startswith("You said: question number").all()
    assert (table["usage_source"] == "upstream").all()
    expected = (table["input_tokens"] * 1.0 + table["output_tokens"] * 4.0) / 1e6
    assert table["cost_usd"].to_numpy() == pytest.approx(expected.to_numpy())
    assert (table["ttft_s"] > 0).all() and (table["latency_s"] >= table["ttft_s"]).all()
    assert (table["reserved_usd"] >= table["cost_usd"]).all()
    assert summary["spent_usd"] == pytest.approx(table["cost_usd"].sum())


def test_a_rerun_asks_only_the_pairs_without_an_answer(loop, tmp_path):
    catalog, store = _catalog(loop.base_url), tmp_path / "s.sqlite"
    first = collect(_prompts(4), catalog, store, models=["a"], progress=False)
    assert first["calls"] == 4
    loop.server.arrivals.clear()
    second = collect(_prompts(6), catalog, store, progress=False)  # 2 new prompts, 1 new model
    assert second["already_answered"] == 4 and second["calls"] == 8
    assert len(loop.arrivals()["arrivals"]) == 8
    third = collect(_prompts(6), catalog, store, progress=False)
    assert third["calls"] == 0 and third["already_answered"] == 12
    with AnswerStore(store) as db:
        assert len(db.runs()) == 3 and (db.runs()["stop_reason"] == "done").all()


def test_errors_are_rows_retried_by_the_next_run(loop, tmp_path):
    dead = _catalog("http://127.0.0.1:9/v1", names=("a",), max_retries=0)  # nothing listens on port 9
    store = tmp_path / "s.sqlite"
    first = collect(_prompts(2), dead, store, progress=False)
    assert first["errors"] == 2 and first["answers"] == 0
    table = read_store(store)
    assert (table["ok"] == 0).all() and table["error_kind"].notna().all()
    assert table["error_message"].str.len().gt(0).all()
    second = collect(_prompts(2), _catalog(loop.base_url, names=("a",)), store, progress=False)
    assert second["calls"] == 2 and second["answers"] == 2
    table = read_store(store)
    assert table["ok"].all() and len(table) == 2
    with AnswerStore(store) as db:
        assert len(db.calls()) == 4  # the errors stay as history


def test_rejected_requests_are_error_rows_with_their_status(tmp_path):
    with LoopbackThread(model_id="only-this") as srv:  # 404 for any other model id
        summary = collect(_prompts(2), _catalog(srv.base_url, names=("a",)), tmp_path / "s", progress=False)
    assert summary["errors"] == 2
    table = read_store(tmp_path / "s")
    assert set(table["http_status"]) == {404} and set(table["error_kind"]) == {"BadRequest"}


def test_gives_up_on_a_backend_that_keeps_failing(loop, tmp_path):
    catalog = Catalog.from_entries(
        {"backends": [
            {"name": "dead", "kind": "api", "base_url": "http://127.0.0.1:9/v1", "prices": PRICES, "max_retries": 0},
            {"name": "live", "kind": "api", "base_url": loop.base_url, "prices": PRICES},
        ]}
    )  # fmt: skip
    limits = {"dead": BackendLimit(1), "live": BackendLimit(2)}
    summary = collect(_prompts(10), catalog, tmp_path / "s", limits=limits, give_up_after=3, progress=False)
    assert summary["per_model"]["dead"]["calls"] == 3 and summary["per_model"]["dead"]["left"] == 7
    assert summary["per_model"]["live"]["answers"] == 10
    assert "dead" in summary["gave_up"] and "gave up" in summary["stop_reason"]


def test_max_tokens_is_tightened_to_the_backend_and_usage_counted_when_absent(tmp_path):
    with LoopbackThread(stream_usage=False) as srv:
        catalog = _catalog(srv.base_url, names=("a",), max_tokens=4)
        summary = collect(
            _prompts(2), catalog, tmp_path / "s", request=RequestSettings(max_tokens=256), progress=False
        )
    assert summary["answers"] == 2
    table = read_store(tmp_path / "s")
    assert set(table["max_tokens"]) == {4} and set(table["finish_reason"]) == {"length"}
    assert (table["usage_source"] == "counted").all()
    counter = build_token_counter("approx")
    # no chat template on disk for this backend: the prompt's tokens plus the template estimate
    # (one user message: TOKENS_PER_MESSAGE, and REPLY_PRIMING_TOKENS for the reply)
    overhead = TOKENS_PER_MESSAGE + REPLY_PRIMING_TOKENS
    assert table["input_tokens"].tolist() == (counter.count(table["prompt"].tolist()) + overhead).tolist()
    assert table["output_tokens"].tolist() == counter.count(table["answer"].tolist()).tolist()


def test_concurrency_cap_per_backend(tmp_path, monkeypatch):
    in_flight: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}
    ask = runner._ask

    async def counting(client, name, payload, stream):
        in_flight[name] += 1
        peak[name] = max(peak[name], in_flight[name])
        try:
            return await ask(client, name, payload, stream)
        finally:
            in_flight[name] -= 1

    monkeypatch.setattr(runner, "_ask", counting)
    with LoopbackThread(fault=Fault.from_dict({"mode": "slow", "delay_s": 0.005})) as srv:
        limits = {"a": BackendLimit(3), "b": BackendLimit(1)}
        summary = collect(_prompts(12), _catalog(srv.base_url), tmp_path / "s", limits=limits, progress=False)
    assert summary["answers"] == 24
    assert peak == {"a": 3, "b": 1}


def test_rate_limit_spaces_the_requests(loop, tmp_path):
    limits = {"a": BackendLimit(8, rate=10.0)}  # bursts of 10, then 10 per second
    collect(
        _prompts(25), _catalog(loop.base_url, names=("a",)), tmp_path / "s", limits=limits, progress=False
    )
    times = sorted(a["t"] for a in loop.arrivals()["arrivals"])
    assert len(times) == 25
    assert times[-1] - times[0] >= 1.2  # 15 requests after the first burst at 10/s: about 1.5 s


def test_spend_cap_is_never_crossed_and_stops_only_when_the_next_bound_does_not_fit(loop, tmp_path):
    catalog = _catalog(loop.base_url, names=("a",))
    request = RequestSettings(max_tokens=100, template_tokens=10)
    prompts = _prompts(40)
    bound = cost_bound(catalog.get("a").spec, len(prompts[0].prompt.encode()), 100, 10)[0]
    cap = 3.5 * bound  # bills are far below their bounds (~1/7): more than 3 calls fit, not all 40
    summary = collect(prompts, catalog, tmp_path / "s", spend_cap_usd=cap, request=request, progress=False)
    table = read_store(tmp_path / "s")
    assert (
        summary["cap_reached"] and 3 < summary["answers"] < 40 and summary["left"] == 40 - summary["answers"]
    )
    assert table["cost_usd"].sum() <= cap and summary["spent_usd"] <= cap
    assert cap - summary["spent_usd"] < bound  # it stopped because the next bound would cross, not before
    assert "spend cap" in summary["stop_reason"]
    again = collect(prompts, catalog, tmp_path / "s", spend_cap_usd=None, request=request, progress=False)
    assert again["calls"] == summary["left"] and again["stop_reason"] == "done"


# ------------------------------------------------------------------------------- config and CLI
def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="collect", overrides=overrides)


@pytest.mark.parametrize("pool", sorted(p.stem for p in (ROOT / "conf" / "collect").glob("*.yaml")))
def test_every_pool_config_composes_and_its_limits_parse(pool):
    cfg = _compose([f"collect={pool}"])
    catalog = Catalog.load(ROOT / cfg.collect.backends)
    assert set(cfg.collect.get("limits") or {}) <= set(catalog.names)
    limits = backend_limits(catalog.names, cfg.collect)
    assert set(limits) == set(catalog.names)
    RequestSettings(**cfg.request)


def test_collect_from_config_and_cli(loop, tmp_path, capsys):
    from router_ml.cli import main

    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "one"}, {"prompt": "two", "id": "t"}])
    catalog = tmp_path / "pool.yaml"
    catalog.write_text(
        json.dumps({"backends": [{"name": "a", "kind": "api", "base_url": loop.base_url, "prices": PRICES}]})
    )
    overrides = [f"prompts={prompts}", f"store={tmp_path / 's.sqlite'}", f"collect.backends={catalog}",
                 "~collect.limits", "progress=false"]  # fmt: skip
    summary = collect_from_config(_compose(overrides))
    assert summary["answers"] == 2
    assert main(["collect", *overrides]) == 0
    assert json.loads(capsys.readouterr().out)["already_answered"] == 2
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"promt": "typo"}])
    assert main(["collect", *overrides, f"prompts={bad}"]) == 2
    assert "bad.jsonl:2: unknown field(s) ['promt']" in capsys.readouterr().err
    for extra, message in (
        (["prompts=null"], "no prompts"),
        (["data=simulated"], "either prompts=FILE or data=ADAPTER"),
        (["models=[zzz]"], "models ['zzz'] are not in the catalog"),
        (["+collect.limits={nope: {concurrency: 1}}"], "limits names backend(s) ['nope']"),
    ):
        with pytest.raises(
            ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
        ):
            collect_from_config(_compose([*overrides, *extra]))


def test_prompts_from_a_data_adapter():
    cfg = _compose(["data=simulated", "data.max_prompts=12"])
    prompts = runner.load_prompt_set(cfg)
    assert 6 <= len(prompts) <= 14 and len({p.prompt_id for p in prompts}) == len(prompts)
    assert all(p.task and p.source.startswith("simulated/") for p in prompts)


# ------------------------------------------------------------------------------- kill -9 resume
@pytest.mark.full
def test_kill_9_mid_run_loses_and_duplicates_nothing(tmp_path):
    from experiments.bench_collect import kill_resume

    got = kill_resume(tmp_path, n_prompts=60, kill_after=30, concurrency=4)
    assert got["stored_at_kill"] >= 30 and got["left_after_kill"] > 0  # killed mid-run
    assert got["lost"] == 0
    assert got["duplicated"] == 0 and got["missing_after_rerun"] == 0
    assert got["rerun_requests"] == got["left_after_kill"]  # the rerun asked only what was missing
