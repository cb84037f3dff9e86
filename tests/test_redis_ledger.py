"""The Redis spend ledger against a REAL redis-server on loopback (started and stopped by PID):
restart survival with appendonly, four processes writing at once, duplicate ids, windows, a down
server, foreign keys in the namespace, and budgets shared by two decision layers."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from router_ml.decision import DecisionLayer, ModelPool, build_policy
from router_ml.decision.ledger import BudgetLedger, LedgerError, MemoryLedger, open_ledger

redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install redis)")

from router_ml.decision.ledger.redis import NANO, RedisLedger  # noqa: E402

pytestmark = pytest.mark.integration
REDIS_SERVER = os.environ.get("ROUTER_ML_REDIS_SERVER") or shutil.which("redis-server")
if REDIS_SERVER is None:
    pytest.skip(
        "redis-server not found (apt-get install redis-server, or set ROUTER_ML_REDIS_SERVER)",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process with appendonly on, its data in ``folder``."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder, self.port = folder, port or _free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no"]
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115  # the child keeps it
        self.proc = subprocess.Popen([REDIS_SERVER, *args], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                if client.ping() and not client.info("persistence").get("loading"):
                    break
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.folder / "redis.log").read_text()[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.05)
        client.close()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> RedisServer:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def ledger(server: RedisServer) -> RedisLedger:
    led = RedisLedger(server.url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    yield led
    led.close()


def _cost(i: int) -> float:
    """Dyadic costs (k / 64): exact in float64, so MemoryLedger's float sums compare with ==."""
    return (i % 13 + 1) / 64


def _odd_cost(i: int) -> float:
    """Decimal costs (float sums of these drift); nano-dollar integers keep the total exact."""
    return 0.1 + 1e-6 * (i % 7 + 1)


def test_restart_survival_with_appendonly(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "data").start()
    try:
        led = RedisLedger(srv.url, namespace="budget")
        assert led.record(0.25, "gpt-4o", request_id="r1", ts=100.0, session="a", meta={"tokens": 12})
        assert led.record(0.5, "llama", request_id="r2", ts=200.0, session="b")
        assert led.record(1.0, "gpt-4o", ts=300.0)  # generated request id
        assert not led.record(9.0, "gpt-4o", request_id="r1")
        before = led.entries()
        srv.stop(signal.SIGKILL)  # no clean shutdown: the append-only file is all there is
        with pytest.raises(LedgerError, match=f"127.0.0.1:{srv.port}.*cannot be reached"):
            led.spent()
        srv.start()
        assert (led.spent(), led.count()) == (1.75, 3), "the old client reconnects by itself"
        again = RedisLedger(srv.url, namespace="budget")
        assert again.spent() == 1.75 and again.spent(session="a") == 0.25
        assert not again.record(9.0, "gpt-4o", request_id="r1"), "a retry after a restart is not counted"
        assert again.record(0.125, "llama", request_id="r4", ts=200.0)  # ties in ts keep insertion order
        rows = again.entries()
        assert rows["request_id"].tolist() == ["r1", "r2", "r4", before["request_id"].iloc[2]]
        pd.testing.assert_frame_equal(rows.drop(index=2).reset_index(drop=True), before)
        assert rows["meta"].iloc[0] == {"tokens": 12} and rows["session"].iloc[3] is None
        assert again.spent(since=200.0, until=300.0) == 0.625
        assert (tmp_path / "data" / "appendonlydir").is_dir()
    finally:
        srv.stop()


def _replica(url: str, namespace: str, worker: int, n: int, go: object) -> None:
    go.wait(60)  # type: ignore[attr-defined]  # all replicas start together
    led = RedisLedger(url, namespace=namespace)
    for i in range(n):
        led.record(
            _odd_cost(i), f"m{worker % 2}", request_id=f"{worker}-{i}", ts=float(i), session=str(worker)
        )
        if i < 50:  # every replica also books the same 50 retried requests: counted once
            led.record(_odd_cost(i), "shared", request_id=f"shared-{i}", ts=float(i))
    led.close()


def test_four_processes_exact_totals(server: RedisServer) -> None:
    ns = f"procs-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_replica, args=(server.url, ns, w, 200, go)) for w in range(4)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    led = RedisLedger(server.url, namespace=ns)
    nano = [round(_odd_cost(i) * NANO) for i in range(200)]
    assert led.count() == 4 * 200 + 50
    assert led.spent() == (4 * sum(nano) + sum(nano[:50])) / NANO, "exact, not a float sum"
    assert led.spent(session="2") == sum(nano) / NANO and led.count(session="2") == 200
    assert led.spent(since=10.0, until=20.0, session="3") == sum(nano[10:20]) / NANO
    rows = led.entries()
    assert rows["request_id"].nunique() == 850 and (rows["model"] == "shared").sum() == 50
    assert led.spent() == sum(round(c * NANO) for c in rows["cost_usd"]) / NANO
    assert rows["ts"].is_monotonic_increasing


def test_duplicate_ids_from_threads_count_once(ledger: RedisLedger) -> None:
    assert ledger.record(0.5, "m", request_id="same", ts=1.0)
    assert not ledger.record(0.5, "m", request_id="same", ts=1.0)
    assert not ledger.record(3.0, "other", request_id="same", ts=2.0), "the first record wins"
    wins = []

    def write(worker: int) -> None:
        for i in range(40):
            wins.append(ledger.record(_cost(i), f"t{worker}", request_id=f"race-{i}", ts=10.0 + i))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 40, "exactly one writer wins each request id"
    assert ledger.count() == 41
    assert ledger.spent() == 0.5 + sum(_cost(i) for i in range(40))
    assert ledger.entries(since=10.0)["request_id"].tolist() == [f"race-{i}" for i in range(40)]
    with pytest.raises(ValueError, match="cost_usd"):
        ledger.record(-1.0, "m")
    copy = pickle.loads(pickle.dumps(ledger))  # a spawned worker reconnects from the URL
    assert copy.count() == 41 and "namespace" in repr(copy)
    copy.close()
    with pytest.raises(LedgerError, match="closed"):
        copy.spent()


def test_windows_and_sessions_match_memory_ledger(ledger: RedisLedger) -> None:
    rng = np.random.default_rng(0)
    mem = MemoryLedger(resolution_s=1.0)  # whole-second timestamps: its buckets are exact here
    for i in range(300):  # out-of-order timestamps, sessions, retries
        rid = f"r{rng.integers(0, 200)}"
        ts = float(rng.integers(0, 1000))
        session = [None, "a", "b"][int(rng.integers(0, 3))]
        kw = {"request_id": rid, "ts": ts, "session": session, "meta": {"i": i}}
        assert ledger.record(_cost(i), f"m{i % 3}", **kw) == mem.record(_cost(i), f"m{i % 3}", **kw)
    assert mem.count() < 300  # some retries were dropped
    for since, until, session in [
        (None, None, None),
        (100.0, 700.0, None),
        (None, 500.0, "a"),
        (250.0, None, "b"),
        (None, None, "b"),
        (500.0, 500.0, None),
    ]:
        assert ledger.spent(since, until, session) == mem.spent(since, until, session)
        assert ledger.count(since, until, session) == mem.count(since, until, session)
        rows = ledger.entries(since, until, session)
        want = rows.groupby(["ts", "model"]).agg(cost_usd=("cost_usd", "sum"), count=("ts", "size"))
        got = mem.entries(since, until, session).groupby(["ts", "model"])[["cost_usd", "count"]].sum()
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
    ts = ledger.entries()["ts"]
    edge = float(ts.iloc[len(ts) // 2])
    assert ledger.count(since=edge) == int((ts >= edge).sum()), "since is inclusive"
    assert ledger.count(until=edge) == int((ts < edge).sum()), "until is exclusive"
    assert ledger.spent(session="nobody") == 0.0 and ledger.entries(session="nobody").empty


def test_redis_down_raises_ledger_error_naming_the_url(server: RedisServer) -> None:
    port = _free_port()  # nothing listens here
    url = f"redis://:s3cret-pass@127.0.0.1:{port}/0"
    with pytest.raises(LedgerError, match=f"127.0.0.1:{port}") as err:
        RedisLedger(url)
    assert "s3cret-pass" not in str(err.value) and "***" in str(err.value)
    with pytest.raises(LedgerError, match="bad URL"):
        RedisLedger("redis://127.0.0.1:notaport/0")


def test_namespace_holding_something_else_is_refused(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.set("{taken}:ledger:schema", "a string")
    with pytest.raises(LedgerError, match="taken"):
        RedisLedger(server.url, namespace="taken")
    client.hset("{other}:ledger:schema", mapping={"app": "someone-else", "version": 1})
    with pytest.raises(LedgerError, match="does not mark a router-ml spend ledger"):
        RedisLedger(server.url, namespace="other")
    client.hset("{newer}:ledger:schema", mapping={"app": "router-ml-ledger", "version": 99})
    with pytest.raises(LedgerError, match="newer"):
        RedisLedger(server.url, namespace="newer")
    client.close()
    with pytest.raises(ValueError, match="namespace"):
        RedisLedger(server.url, namespace="a{b}")


def test_open_ledger_and_budget_shared_by_two_layers(server: RedisServer, tmp_path: Path) -> None:
    assert isinstance(open_ledger("memory"), MemoryLedger)
    assert isinstance(open_ledger(f"sqlite:{tmp_path / 'l.sqlite'}"), BudgetLedger)
    assert isinstance(open_ledger(server.url), RedisLedger)
    ns = f"layers-{uuid.uuid4().hex[:8]}"
    one, two = (RedisLedger(server.url, namespace=ns) for _ in range(2))
    pool = ModelPool.simulated()
    replicas = [
        DecisionLayer(build_policy("utility"), pool, ledger=led, session="team", period="day")
        for led in (one, two)
    ]
    assert replicas[0].record("gpt-4o", cost_usd=0.003, request_id="req-1")
    assert not replicas[1].record("gpt-4o", cost_usd=0.003, request_id="req-1"), "the other replica saw it"
    assert replicas[1].record("gpt-4o-mini", cost_usd=0.0004, request_id="req-2")
    assert math.isclose(replicas[0].spent(), 0.0034, rel_tol=0, abs_tol=1e-12)
    assert replicas[0].spent() == replicas[1].spent() == 3_400_000 / NANO


# ---------------------------------------------------------------------------------- reservations
def test_reserve_settle_release_and_lapse(ledger: RedisLedger) -> None:
    led = ledger
    assert led.reserve("a", 0.25, 1.0) and led.reserve("b", 0.5, 1.0)
    assert not led.reserve("c", 0.5, 1.0), "spent 0 + held 0.75 + 0.5 > 1"
    assert led.reserved() == 0.75
    assert led.record(0.125, "m", request_id="a")  # the record script settles a's hold
    assert led.reserved() == 0.5 and led.spent() == 0.125
    assert led.release("b") and not led.release("b")
    assert led.reserve("c", 0.875, 1.0) and not led.reserve("d", 0.0625, 1.0)
    assert led.release("c")
    # holds lapse on the server's clock: a real 0.3 s ttl
    assert led.reserve("e", 0.875, 1.0, ttl_s=0.3)
    assert not led.reserve("f", 0.5, 1.0)
    time.sleep(0.4)
    assert led.reserved() == 0.0 and led.reserve("f", 0.5, 1.0)
    led.release("f")
    assert led.record(0.75, "m", request_id="old", ts=10.0)  # a past period's spend
    assert not led.reserve("g", 0.25, 1.0) and led.reserve("g", 0.25, 1.0, since=3600.0)
    assert led.reserve("h", 0.5, 0.5, session="team") and not led.reserve("i", 0.0625, 0.5, session="team")
    assert led.reserved(session="team") == 0.5


def _reserving_replica(url: str, namespace: str, worker: int, go: object, out: object) -> None:
    led = RedisLedger(url, namespace=namespace)
    go.wait(60)  # type: ignore[attr-defined]
    held = [i for i in range(40) if led.reserve(f"{worker}-{i}", 1 / 64, 0.5)]
    out.put(len(held))  # type: ignore[attr-defined]
    go.wait(60)  # type: ignore[attr-defined]  # every replica has tried before any settles
    for i in held[::2]:  # settle every other hold at its bound; the rest fail and release
        led.record(1 / 64, "m", request_id=f"{worker}-{i}")
    for i in held[1::2]:
        led.release(f"{worker}-{i}")
    led.close()


def test_processes_racing_at_the_cap_never_exceed_it(server: RedisServer) -> None:
    """Four replica processes, 40 tries each at a $0.5 cap in 1/64 steps: exactly 32 holds in all,
    and after settling and releasing, spend + holds never passed the cap."""
    ns = f"race-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    go, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_reserving_replica, args=(server.url, ns, w, go, out)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    held = [out.get(timeout=5) for _ in procs]
    led = RedisLedger(server.url, namespace=ns)
    assert sum(held) == 32, held  # exactly the cap's worth, never more
    settled = sum((h + 1) // 2 for h in held)
    assert led.reserved() == 0.0 and led.spent() == settled / 64 <= 0.5
    led.close()


def test_reserve_sums_hour_totals_as_the_records_do(ledger: RedisLedger) -> None:
    """A budget period starts on an hour: reserve reads the hour totals, which must agree with the
    records (sessions too), and a version-1 namespace gains them when opened."""
    for i in range(60):
        ledger.record(_cost(i), "m", request_id=f"h{i}", ts=1800.0 * i + 17, session=["a", "b", None][i % 3])

    def check(led: RedisLedger) -> None:
        for since in (0.0, 3600.0, 36000.0, 7200.0 * 10):
            for session in (None, "a"):
                room = 0.25
                cap = led.spent(since=since, session=session) + room
                assert led.reserve("x", room, cap, since=since, session=session)
                assert led.release("x")
                assert not led.reserve("y", room + 1 / 64, cap, since=since, session=session)

    check(ledger)
    r = ledger._r
    r.delete(ledger._k + "hours")  # what version 1 left: records, no hour totals
    r.hset(ledger._k + "schema", "version", 1)
    again = RedisLedger(ledger.url, namespace=ledger.namespace)
    assert r.hget(ledger._k + "schema", "version") == "2"
    check(again)
    again.close()


def test_each_record_keeps_the_serving_backend(ledger: RedisLedger) -> None:
    assert ledger.record(0.25, "qwen-7b", request_id="r1", ts=10.0, backend="smollm2-vllm")
    assert ledger.record(0.5, "qwen-7b", request_id="r2", ts=20.0)  # as written before backends were kept
    rows = ledger.entries()
    assert rows["model"].tolist() == ["qwen-7b", "qwen-7b"]
    assert rows["backend"].tolist() == ["smollm2-vllm", None]
