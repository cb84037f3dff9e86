"""Virtual API keys shared by proxy replicas through a REAL redis-server (started and stopped by
PID): the Redis key store (hashes only, rate windows from many connections at once, settle and
release), and three proxy apps under uvicorn sharing one store: 64 concurrent requests at the
edge of a key's rate limit and of its budget serve none beyond them."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid

import httpx
import pytest

from router_ml.serving.keys import KeyGate, Team, key_usage, open_key_store
from router_ml.serving.keys.redis_store import RedisKeyStore
from router_ml.serving.proxy import create_app
from tests.test_proxy import Served, _catalog, _engine, backends, router  # noqa: F401
from tests.test_redis_ledger import RedisServer

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "Say something about limits."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> RedisServer:
    srv = RedisServer(tmp_path_factory.mktemp("redis-keys")).start()
    yield srv
    srv.stop()


@pytest.fixture
def store(server: RedisServer) -> RedisKeyStore:
    s = RedisKeyStore(server.url, namespace=f"keys-{uuid.uuid4().hex[:8]}")
    yield s
    s.close()


def test_only_hashes_are_stored_and_the_store_is_shared(store, server):
    key, secret = store.create_key("alice", budget_usd=1.0, rpm=5, models=("fast",), team="ml")
    store.set_team(Team("ml", budget_usd=9.0))
    with pytest.raises(ValueError, match="'alice' already exists"):
        store.create_key("alice")
    r = redis.Redis.from_url(server.url)
    dump = b"".join(
        repr(r.dump(k)).encode() + k for k in r.scan_iter(match=f"{{{store.namespace}}}:*")
    )  # every key and value of the namespace
    assert secret.encode() not in dump and key.secret_hash.encode() in dump
    other = open_key_store(server.url)  # the default namespace: another store
    assert other.key_by_secret(secret) is None
    other.close()
    again = RedisKeyStore(server.url, namespace=store.namespace)  # another replica
    assert again.key_by_secret(secret) == key and again.team("ml").budget_usd == 9.0
    again.revoke("alice")
    assert not store.key_by_secret(secret).active and [k.name for k in store.list_keys()] == ["alice"]
    again.close()


def test_rate_windows_hold_across_connections(store, server):
    key, _ = store.create_key("k", rpm=9, tpm=1000)
    admitted: list[bool] = []
    lock = threading.Lock()

    def replica(w: int) -> None:
        s = RedisKeyStore(server.url, namespace=store.namespace)
        for i in range(8):
            ok = s.admit_rate(key, f"w{w}-{i}", 10).ok
            with lock:
                admitted.append(ok)
        s.close()

    threads = [threading.Thread(target=replica, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 9 and store.rate_usage(key) == (9, 90)
    v = store.admit_rate(key, "one-more", 10)
    assert (v.ok, v.limit) == (False, "rpm") and 0 < v.retry_after_s <= 60
    tight, _ = store.create_key("tight", tpm=100)
    assert store.admit_rate(tight, "a", 70).ok and not store.admit_rate(tight, "b", 70).ok
    store.settle_rate(tight, "a", 20)
    assert store.admit_rate(tight, "b", 70).ok and store.rate_usage(tight) == (2, 90)
    store.release_rate(tight, "b")
    assert store.rate_usage(tight) == (1, 20)
    assert store.admit_rate(tight, "c", 101).retry_after_s is None  # over the limit on its own


def _burst(urls: list[str], secret: str, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(
            timeout=60, headers=headers, limits=httpx.Limits(max_connections=n)
        ) as c:
            body = {"model": "big", "messages": MSG, "max_tokens": 16}
            return await asyncio.gather(*(c.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=body)
                                          for i in range(n)))  # fmt: skip

    return asyncio.run(go())


def test_three_replicas_serve_nothing_beyond_a_keys_limit_or_budget(router, backends, server):  # noqa: F811
    os.environ["ROUTER_ML_TEST_BIG_KEY"] = "sk-test-" + "x" * 32
    namespace = f"keys-{uuid.uuid4().hex[:8]}"
    stores = [RedisKeyStore(server.url, namespace=namespace) for _ in range(3)]
    _, limited = stores[0].create_key("limited", rpm=20)
    budgeted, capped = stores[0].create_key("budgeted", budget_usd=2e-3)
    big = backends[1]
    big.set_fault("slow", delay_s=0.02)  # every request of a burst is in flight together
    try:
        apps = [Served(create_app(_engine(router, _catalog(*backends), keys=KeyGate(s)))) for s in stores]
        urls = [a.__enter__() for a in apps]
        try:
            replies = _burst(urls, limited, 64)
            codes = [r.status_code for r in replies]
            assert codes.count(200) == 20 and codes.count(429) == 44  # 0 beyond the limit
            assert {r.json()["error"]["code"] for r in replies if r.status_code == 429} == {
                "rate_limit_exceeded"
            }
            replies = _burst(urls, capped, 64)
            served = [r for r in replies if r.status_code == 200]
            refused = [r for r in replies if r.status_code == 429]
            assert served and len(served) + len(refused) == 64
            assert {r.json()["error"]["code"] for r in refused} == {"budget_exhausted"}
            usage = key_usage(stores[1], budgeted)
            assert 0 < usage["spent_usd"] <= 2e-3 and usage["held_usd"] == 0
            bill = sum(r.json()["usage"]["prompt_tokens"] * 3e-6 + r.json()["usage"]["completion_tokens"] * 15e-6
                       for r in served)  # fmt: skip
            assert usage["spent_usd"] == pytest.approx(bill, rel=1e-6)  # every served call is booked
        finally:
            for a in apps:
                a.__exit__(None, None, None)
    finally:
        big.set_fault("ok")
        for s in stores:
            s.close()
