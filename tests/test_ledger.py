"""Spend ledgers: restarts, concurrent writers (threads, spawned and forked processes), kill -9,
idempotent retries, bad files, budget periods, and the in-memory twin."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from router_ml.decision.ledger import (
    SCHEMA_VERSION,
    BudgetLedger,
    LedgerError,
    MemoryLedger,
    open_ledger,
    period_start,
)

REPO = Path(__file__).resolve().parent.parent


def _cost(i: int) -> float:
    """Dyadic costs (k / 64): every partial sum is exact in float64, whatever the order."""
    return (i % 13 + 1) / 64


def test_records_survive_restart(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "spend.sqlite"  # the parent folder is created
    with BudgetLedger(path) as ledger:
        assert ledger.record(0.25, "gpt-4o", request_id="r1", ts=100.0, session="a", meta={"tokens": 12})
        assert ledger.record(0.5, "llama", request_id="r2", ts=200.0, session="b")
        assert ledger.record(1.0, "gpt-4o", ts=300.0)  # generated request id
    with BudgetLedger(path) as again:
        assert again.spent() == 1.75
        assert again.count() == 3
        assert not again.record(9.0, "gpt-4o", request_id="r1"), "a retry after a restart is not counted"
        assert again.spent() == 1.75
        rows = again.entries()
    assert list(rows.columns) == ["request_id", "ts", "model", "cost_usd", "session", "meta", "backend"]
    assert rows["request_id"].tolist()[:2] == ["r1", "r2"]
    assert len(rows["request_id"].iloc[2]) == 32  # uuid4 hex
    assert rows["ts"].tolist() == [100.0, 200.0, 300.0]
    assert rows["meta"].iloc[0] == {"tokens": 12}
    assert rows["meta"].iloc[1] is None
    assert rows["session"].tolist()[:2] == ["a", "b"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_request_id_counted_once(tmp_path: Path) -> None:
    for ledger in (BudgetLedger(tmp_path / "l.sqlite"), MemoryLedger()):
        assert ledger.record(0.5, "m", request_id="same", ts=1.0)
        assert not ledger.record(0.5, "m", request_id="same", ts=1.0)
        assert not ledger.record(3.0, "other", request_id="same", ts=2.0), "the first record wins"
        assert (ledger.spent(), ledger.count()) == (0.5, 1)
        assert ledger.entries()["model"].tolist() == ["m"]
        ledger.close()


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf"), "free"])
def test_invalid_cost_is_refused(tmp_path: Path, bad: object) -> None:
    for ledger in (BudgetLedger(tmp_path / "l.sqlite"), MemoryLedger()):
        with pytest.raises(ValueError, match="cost_usd"):
            ledger.record(bad, "m")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="model"):
            ledger.record(1.0, "")
        with pytest.raises(ValueError, match="meta"):
            ledger.record(1.0, "m", meta={"x": object()})
        assert ledger.count() == 0
        ledger.close()


def test_windows_and_sessions(tmp_path: Path) -> None:
    for ledger in (BudgetLedger(tmp_path / "l.sqlite"), MemoryLedger(resolution_s=5.0)):
        for i, (ts, session) in enumerate([(10.0, "a"), (20.0, "b"), (20.0, "a"), (30.0, None)]):
            ledger.record(_cost(i), "m", request_id=str(i), ts=ts, session=session)
        assert ledger.spent(since=20.0) == _cost(1) + _cost(2) + _cost(3)  # since is inclusive
        assert ledger.spent(until=20.0) == _cost(0)  # until is exclusive
        assert ledger.spent(since=10.0, until=30.0, session="a") == _cost(0) + _cost(2)
        assert ledger.count(session="b") == 1
        assert ledger.count(session="nobody") == 0 and ledger.spent(session="nobody") == 0.0
        rows = ledger.entries(since=15.0, until=25.0)
        if isinstance(ledger, BudgetLedger):
            assert rows["request_id"].tolist() == ["1", "2"]
        else:  # aggregates: one row per (bucket, session, model)
            assert rows["session"].tolist() == ["a", "b"] and rows["count"].tolist() == [1, 1]
        ledger.close()


def _spawned_writer(ledger: BudgetLedger | str, worker: int, n: int, go: object) -> None:
    go.wait(60)  # type: ignore[attr-defined]  # all workers start together
    if isinstance(ledger, str):
        ledger = BudgetLedger(ledger)  # concurrent creation of the same new file
    for i in range(n):
        ledger.record(
            _cost(i), f"m{worker % 2}", request_id=f"{worker}-{i}", ts=float(i), session=str(worker)
        )
    ledger.close()


def test_four_spawned_processes_write_exactly(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"  # does not exist yet: the four workers race to create it
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_spawned_writer, args=(str(path), w, 200, go)) for w in range(4)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    ledger = BudgetLedger(path)
    assert ledger.count() == 800
    assert ledger.spent() == 4 * sum(_cost(i) for i in range(200))
    assert ledger.entries()["request_id"].nunique() == 800
    assert ledger.spent(session="2") == sum(_cost(i) for i in range(200))


def test_threads_share_one_ledger(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "l.sqlite")

    def write(worker: int) -> None:
        for i in range(50):
            ledger.record(_cost(i), "m", request_id=f"{worker}-{i % 40}")  # 10 retries per thread

    threads = [threading.Thread(target=write, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.count() == 6 * 40
    assert ledger.spent() == 6 * sum(_cost(i) for i in range(40))
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.spent()


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_reopens_its_connection(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "l.sqlite")
    ledger.record(1.0, "parent", request_id="p")  # the parent's connection is open before the fork
    assert pickle.loads(pickle.dumps(ledger)).path == ledger.path  # a spawned worker gets its path
    child = mp.get_context("fork").Process(target=_spawned_writer, args=(ledger, 7, 20, _Ready()))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert ledger.count() == 21
    assert ledger.spent() == 1.0 + sum(_cost(i) for i in range(20))
    assert ledger.record(0.5, "parent", request_id="p2"), "the parent's connection still works"


class _Ready:
    def wait(self, timeout: float) -> bool:
        return True


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from router_ml.decision.ledger import BudgetLedger
    ledger = BudgetLedger(sys.argv[1])
    i = 0
    while True:  # until killed
        ledger.record((i % 13 + 1) / 64, "m", request_id=f"k-{i}", ts=float(i), meta={"i": i})
        i += 1
        if i % 50 == 0:
            print(i, flush=True)
    """
)


def test_killed_writer_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if int(line) >= 300:
                break
        proc.send_signal(signal.SIGKILL)  # while it is in the middle of later writes
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ledger = BudgetLedger(path)
    rows = ledger.entries()
    n = ledger.count()
    assert n >= 300 and len(rows) == n
    assert ledger.spent() == math.fsum(rows["cost_usd"])
    assert rows["request_id"].tolist() == [f"k-{i}" for i in range(n)], "a prefix of the writes, no gaps"
    assert ledger.record(1.0, "m", request_id="after"), "the ledger goes on after the crash"


def test_not_a_ledger_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database, just bytes " * 200)
    with pytest.raises(LedgerError, match=re.escape(str(garbage))):
        BudgetLedger(garbage)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(LedgerError, match="not a spend ledger"):
        BudgetLedger(other)
    newer = tmp_path / "newer.sqlite"
    BudgetLedger(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(LedgerError, match="newer"):
        BudgetLedger(newer)
    with pytest.raises(LedgerError, match="directory"):
        BudgetLedger(tmp_path)
    empty = tmp_path / "empty.sqlite"
    empty.touch()  # an empty file is an empty database: it becomes a ledger
    assert BudgetLedger(empty).count() == 0


def _utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_period_start() -> None:
    now = _utc(2024, 3, 13, 15, 42, 10)  # a Wednesday
    assert period_start("hour", now) == _utc(2024, 3, 13, 15)
    assert period_start("day", now) == _utc(2024, 3, 13)
    assert period_start("week", now) == _utc(2024, 3, 11)  # Monday
    assert period_start("month", now) == _utc(2024, 3, 1)
    assert period_start("day", _utc(2024, 3, 13)) == _utc(2024, 3, 13), "a period starts at its start"
    assert period_start("week", _utc(2024, 3, 10, 23, 59)) == _utc(2024, 3, 4)  # Sunday -> last Monday
    assert period_start("session", now) is None and period_start(None) is None
    assert period_start("day") <= time.time()
    with pytest.raises(ValueError, match=r"'year'.*'hour'"):
        period_start("year", now)


def test_memory_ledger_matches_sqlite(tmp_path: Path) -> None:
    """Its per-bucket aggregates answer every window on bucket boundaries as the rows do."""
    rng = np.random.default_rng(0)
    disk, mem = BudgetLedger(tmp_path / "l.sqlite"), MemoryLedger(resolution_s=50.0)
    for i in range(400):  # out-of-order timestamps, sessions, retries
        rid = f"r{rng.integers(0, 300)}"
        ts = float(rng.integers(0, 1000))
        session = [None, "a", "b"][int(rng.integers(0, 3))]
        kw = {"request_id": rid, "ts": ts, "session": session, "meta": {"i": i}}
        assert disk.record(_cost(i), f"m{i % 3}", **kw) == mem.record(_cost(i), f"m{i % 3}", **kw)
    for since, until, session in [
        (None, None, None),
        (100.0, 700.0, None),
        (None, 500.0, "a"),
        (250.0, None, "b"),
    ]:
        assert disk.spent(since, until, session) == mem.spent(since, until, session)  # dyadic: exact
        assert disk.count(since, until, session) == mem.count(since, until, session)
        rows = disk.entries(since, until, session)
        rows["ts"] = rows["ts"] // 50 * 50
        want = (
            rows.groupby(["ts", "session", "model"], dropna=False)
            .agg(cost_usd=("cost_usd", "sum"), count=("cost_usd", "size"))
            .reset_index()
        )
        got = mem.entries(since, until, session)
        assert list(got.columns) == ["ts", "model", "cost_usd", "session", "count", "backend"]
        key = ["ts", "session", "model"]
        got = got.fillna({"session": ""}).sort_values(key).reset_index(drop=True)
        want = want.fillna({"session": ""}).sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)
    assert mem.count() < 400  # some retries were dropped


def test_memory_ledger_keeps_aggregates_not_rows() -> None:
    """A day of calls in hourly buckets: a handful of aggregates, windows on hour bounds exact, and
    duplicate ids still counted once within the dedupe memory."""
    mem = MemoryLedger(dedupe_ids=1000)
    for i in range(24 * 500):
        ts = 86400.0 + (i // 500) * 3600 + i % 500 * 7
        mem.record(_cost(i), f"m{i % 2}", request_id=str(i), ts=ts, session="s")
    assert mem.count() == 12_000 and len(mem._all.start) == 24
    assert len(mem.entries()) == 48  # 24 hours x 2 models
    assert mem.spent(since=86400.0 + 3600, until=86400.0 + 7200) == sum(_cost(i) for i in range(500, 1000))
    assert mem.count(since=86400.0 + 3600 * 23, session="s") == 500
    assert not mem.record(1.0, "m0", request_id="11999")  # a recent retry
    assert mem.count() == 12_000
    assert len(mem._ids) == 1000  # old ids are forgotten: memory stays flat


def test_open_ledger(tmp_path: Path) -> None:
    assert isinstance(open_ledger(None), MemoryLedger)
    empty = open_ledger(None).entries()
    assert list(empty.columns) == ["ts", "model", "cost_usd", "session", "count", "backend"] and empty.empty
    assert isinstance(open_ledger("memory"), MemoryLedger)
    ledger = open_ledger(f"sqlite:{tmp_path / 'a.sqlite'}")
    assert isinstance(ledger, BudgetLedger) and ledger.path == tmp_path / "a.sqlite"
    assert isinstance(open_ledger(str(tmp_path / "b.sqlite")), BudgetLedger)
    with pytest.raises(ValueError, match="needs a path"):
        open_ledger("sqlite:")


# ---------------------------------------------------------------------------------- reservations
@pytest.fixture(params=["memory", "sqlite"])
def any_ledger(request, tmp_path: Path):
    ledger = MemoryLedger() if request.param == "memory" else BudgetLedger(tmp_path / "l.sqlite")
    yield ledger
    ledger.close()


def test_reserve_settle_release_and_lapse(any_ledger) -> None:
    led = any_ledger
    assert led.reserve("a", 0.25, 1.0) and led.reserve("b", 0.5, 1.0)
    assert not led.reserve("c", 0.5, 1.0), "spent 0 + held 0.75 + 0.5 > 1"
    assert led.reserved() == 0.75
    assert led.record(0.125, "m", request_id="a")  # settles a's hold with its real bill
    assert led.reserved() == 0.5 and led.spent() == 0.125
    assert led.release("b") and not led.release("b")
    assert led.reserved() == 0.0
    assert led.reserve("c", 0.875, 1.0) and not led.reserve("d", 0.0625, 1.0)
    assert led.release("c")
    # a hold lapses after its ttl (a crashed replica's holds stop blocking the budget)
    assert led.reserve("e", 0.875, 1.0, ttl_s=60, now=1000.0)
    assert not led.reserve("f", 0.5, 1.0, now=1059.0)
    assert led.reserved(now=1059.0) == 0.875 and led.reserved(now=1061.0) == 0.0
    assert led.reserve("f", 0.5, 1.0, now=1061.0)
    led.release("f")
    # the window: spend before `since` does not count against this period's cap
    assert led.record(0.75, "m", request_id="old", ts=10.0)
    assert not led.reserve("g", 0.25, 1.0)
    assert led.reserve("g", 0.25, 1.0, since=3600.0)
    # sessions: a session's cap counts its own spend and holds
    assert led.reserve("h", 0.5, 0.5, session="team")
    assert not led.reserve("i", 0.0625, 0.5, session="team")
    assert led.reserved(session="team") == 0.5


@pytest.mark.parametrize(
    "bad", [{"amount_usd": -1.0}, {"amount_usd": math.nan}, {"ttl_s": 0}, {"cap_usd": "x"}]
)
def test_bad_reservations_are_refused(any_ledger, bad) -> None:
    kw = {"amount_usd": 0.1, "cap_usd": 1.0, "ttl_s": 10.0, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        any_ledger.reserve("r", **kw)
    with pytest.raises(ValueError, match="request_id"):
        any_ledger.reserve("", 0.1, 1.0)


def test_threads_racing_at_the_cap_never_exceed_it(any_ledger) -> None:
    led, got = any_ledger, []
    led.record(0.25, "m", request_id="before")
    go = threading.Barrier(16)

    def worker(w: int) -> None:
        go.wait()
        for i in range(20):
            if led.reserve(f"{w}-{i}", 1 / 64, 1.0):
                got.append(f"{w}-{i}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 48 and led.reserved() == 0.75  # (1 - 0.25) / (1/64): exactly, never more
    for rid in got:  # settle half at their bound, release the rest: the spend stays under the cap
        assert (
            led.record(1 / 64, "m", request_id=rid)
            if rid.endswith(("0", "2", "4", "6", "8"))
            else led.release(rid)
        )
    assert led.reserved() == 0.0 and led.spent() <= 1.0


def _spawned_reserver(path: str, worker: int, go) -> None:
    ledger = BudgetLedger(path)
    go.wait()
    for i in range(40):
        ledger.reserve(f"{worker}-{i}", 1 / 64, 0.5)
    ledger.close()


def test_processes_racing_at_the_cap_never_exceed_it(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    BudgetLedger(path).close()
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_spawned_reserver, args=(str(path), w, go)) for w in range(4)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with BudgetLedger(path) as ledger:
        assert ledger.reserved() == 0.5  # 32 of the 160 tries held, exactly the cap
        held = sqlite3.connect(path).execute("SELECT count(*) FROM reservations").fetchone()[0]
        assert held == 32


def test_holds_survive_a_restart_and_a_version_1_file_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with BudgetLedger(path) as ledger:
        assert ledger.reserve("a", 0.5, 1.0)
    with BudgetLedger(path) as again:
        assert again.reserved() == 0.5 and not again.reserve("b", 0.75, 1.0)
    old = tmp_path / "v1.sqlite"
    with sqlite3.connect(old) as db:  # what version 1 wrote: the spend table only
        db.execute(
            "CREATE TABLE spend (request_id TEXT PRIMARY KEY, ts REAL NOT NULL, model TEXT NOT NULL,"
            " cost_usd REAL NOT NULL CHECK (cost_usd >= 0), session TEXT, meta TEXT)"
        )
        db.execute("INSERT INTO spend VALUES ('x', 1.0, 'm', 0.25, NULL, NULL)")
        db.execute("PRAGMA application_id = 1380797511")
        db.execute("PRAGMA user_version = 1")
    with BudgetLedger(old) as upgraded:
        assert upgraded.spent() == 0.25 and upgraded.reserve("a", 0.75, 1.0)
        assert not upgraded.reserve("b", 0.01, 1.0)
        assert upgraded.release("a")  # the hour totals a period's reservation sums were backfilled:
        assert not upgraded.reserve("c", 0.8, 1.0, since=0.0) and upgraded.reserve("c", 0.75, 1.0, since=0.0)
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_each_record_keeps_the_serving_backend_next_to_the_decided_model(tmp_path: Path) -> None:
    with BudgetLedger(tmp_path / "l.sqlite") as disk:
        mem = MemoryLedger()
        for ledger in (disk, mem):
            assert ledger.record(0.25, "qwen-7b", request_id="r1", ts=10.0, backend="smollm2-vllm")
            assert ledger.record(0.5, "qwen-7b", request_id="r2", ts=20.0, backend="smollm2-llamacpp")
            assert ledger.record(1.0, "gpt-4o", request_id="r3", ts=30.0)  # no backend given
            with pytest.raises(ValueError, match="backend must be a non-empty string"):
                ledger.record(1.0, "gpt-4o", request_id="r4", backend="")
        rows = disk.entries()
        assert rows["model"].tolist() == ["qwen-7b", "qwen-7b", "gpt-4o"]
        assert rows["backend"].tolist() == ["smollm2-vllm", "smollm2-llamacpp", None]
        agg = mem.entries().sort_values("cost_usd")
        assert agg["backend"].tolist() == ["smollm2-vllm", "smollm2-llamacpp", None]
        assert agg["count"].tolist() == [1, 1, 1]


def test_a_version_2_ledger_gains_the_backend_column_and_keeps_its_rows(tmp_path: Path) -> None:
    old = tmp_path / "v2.sqlite"
    with BudgetLedger(old) as ledger:  # write a current file, then turn it back into version 2
        ledger.record(0.25, "m", request_id="x", ts=1.0, backend="b")
    with sqlite3.connect(old) as db:
        db.execute("ALTER TABLE spend DROP COLUMN backend")
        db.execute("PRAGMA user_version = 2")
    with sqlite3.connect(old) as db:
        assert "backend" not in [r[1] for r in db.execute("PRAGMA table_info(spend)")]
    with BudgetLedger(old) as upgraded:
        assert upgraded.spent() == 0.25
        assert upgraded.record(0.5, "m", request_id="y", ts=2.0, backend="b2")
        rows = upgraded.entries()
    assert rows["request_id"].tolist() == ["x", "y"] and rows["backend"].tolist() == [None, "b2"]
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
