"""Virtual API keys without a proxy: secrets stored hashed, the sliding-window rate limits, key and
team budgets as reservation scopes of the SpendGuard, authentication, and ``router-ml keys``, with
the real SQLite store, ledgers, catalog and token counters."""

from __future__ import annotations

import json
import threading

import pytest

from router_ml.backends.catalog import Catalog
from router_ml.backends.client import BackendClient
from router_ml.cli import main
from router_ml.decision.ledger import MemoryLedger
from router_ml.serving.budget import SpendGuard
from router_ml.serving.keys import KeyGate, Team, hash_secret, key_usage, open_key_store
from router_ml.serving.keys.records import ApiKey
from router_ml.serving.keys.sqlite_store import SqliteKeyStore
from router_ml.serving.keys.window import RATE_WINDOW_S, verdict_of
from router_ml.serving.openai_errors import ApiError
from router_ml.serving.proxy import _same_file

MESSAGES = [{"role": "user", "content": "How far is the Moon?"}]


@pytest.fixture
def store(tmp_path) -> SqliteKeyStore:
    with SqliteKeyStore(tmp_path / "keys.sqlite") as s:
        yield s


@pytest.fixture
def client() -> BackendClient:
    entries = [
        {"name": "cheap", "kind": "api", "base_url": "http://127.0.0.1:9/v1",
         "prices": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}},
        {"name": "pricey", "kind": "api", "base_url": "http://127.0.0.1:9/v1",
         "prices": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}},
    ]  # fmt: skip
    return BackendClient(Catalog.from_entries({"backends": entries}))


def test_the_secret_is_returned_once_and_only_its_hash_is_stored(store, tmp_path):
    key, secret = store.create_key("alice", budget_usd=2.0, rpm=10, models=("cheap",))
    assert secret.startswith("rml-") and len(secret) >= 40
    assert key.secret_hash == hash_secret(secret) and secret not in json.dumps(key.to_record())
    assert "secret_hash" not in key.to_dict()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the file and its WAL
    assert secret.encode() not in raw and key.secret_hash.encode() in raw
    assert store.key_by_secret(secret) == key
    assert store.key_by_secret(secret + "x") is None
    other, secret2 = store.create_key("bob")
    assert secret2 != secret and other.id != key.id
    with pytest.raises(ValueError, match="'alice' already exists"):
        store.create_key("alice")
    # the store survives a reopen (a proxy restart)
    with SqliteKeyStore(tmp_path / "keys.sqlite") as again:
        assert [k.name for k in again.list_keys()] == ["alice", "bob"]
        assert again.key_by_secret(secret).models == ("cheap",)


def test_bad_limits_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="rpm"):
        ApiKey("key_1", "a", "h", rpm=0)
    with pytest.raises(ValueError, match="tpm"):
        ApiKey("key_1", "a", "h", tpm=1.5)
    with pytest.raises(ValueError, match="budget_usd"):
        ApiKey("key_1", "a", "h", budget_usd=float("nan"))
    with pytest.raises(ValueError, match="'session'"):
        ApiKey("key_1", "a", "h", period="session")
    with pytest.raises(ValueError, match="team name"):
        Team("no spaces")


def test_the_window_verdict_names_the_limit_and_when_it_frees():
    key = ApiKey("key_1", "a", "h", rpm=3, tpm=100)
    now = 1000.0
    assert verdict_of(key, [(990.0, 10), (995.0, 10)], 50, now).ok
    v = verdict_of(key, [(950.0, 1), (980.0, 1), (990.0, 1)], 1, now)  # a 4th request in the minute
    assert (v.ok, v.limit) == (False, "rpm") and v.retry_after_s == pytest.approx(950 + RATE_WINDOW_S - now)
    v = verdict_of(key, [(950.0, 40), (980.0, 40)], 30, now)  # 80 + 30 > 100: the first must leave
    assert (v.ok, v.limit) == (False, "tpm") and v.retry_after_s == pytest.approx(10.0)
    v = verdict_of(key, [], 101, now)  # its bound alone is over the limit: no retry helps
    assert (v.ok, v.limit, v.retry_after_s) == (False, "tpm", None)


def test_rate_limits_hold_across_threads_and_connections(tmp_path):
    path = tmp_path / "keys.sqlite"
    with SqliteKeyStore(path) as s:
        key, _ = s.create_key("k", rpm=7)
    admitted: list[bool] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        with SqliteKeyStore(path) as s:  # its own connection, as another proxy process would
            for i in range(10):
                ok = s.admit_rate(key, f"w{w}-{i}", 1).ok
                with lock:
                    admitted.append(ok)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 7 and len(admitted) == 40
    with SqliteKeyStore(path) as s:
        assert s.rate_usage(key) == (7, 7)
        # a minute later the window is empty again
        assert s.admit_rate(key, "later", 1, now=__import__("time").time() + RATE_WINDOW_S + 1).ok


def test_tokens_are_held_at_the_bound_then_settled_or_released(store):
    key, _ = store.create_key("k", tpm=100)
    assert store.admit_rate(key, "r1", 60).ok
    v = store.admit_rate(key, "r2", 60)
    assert not v.ok and v.limit == "tpm" and 0 < v.retry_after_s <= RATE_WINDOW_S
    store.settle_rate(key, "r1", 25)  # the call used 25 tokens of its 60
    assert store.admit_rate(key, "r2", 60).ok and store.rate_usage(key) == (2, 85)
    store.release_rate(key, "r2")  # reached no backend
    assert store.rate_usage(key) == (1, 25)


def test_key_and_team_budgets_are_scopes_of_the_same_reservation(store, client):
    guard = SpendGuard(MemoryLedger(), client, budget_usd=None, default_max_tokens=100)
    gate = KeyGate(store)
    bounds, tokens = guard.plan(["pricey"], {}, MESSAGES)
    bound = bounds[0]
    assert tokens > 100  # input tokens + the 100 output tokens
    store.set_team(Team("ml", budget_usd=3.5 * bound, period="month"))
    alice, _ = store.create_key("alice", budget_usd=2.5 * bound, team="ml")
    bob, _ = store.create_key("bob", team="ml")  # no budget of its own: the team's applies
    for i in range(2):
        guard.hold(f"a{i}", ["pricey"], bounds, None, gate.scopes(alice))
    with pytest.raises(ApiError) as err:  # alice's third call: her own budget refuses
        guard.hold("a2", ["pricey"], bounds, None, gate.scopes(alice))
    e = err.value
    assert e.status == 429 and e.body()["error"]["code"] == "budget_exhausted"
    assert "key 'alice'" in e.message and 1 <= int(e.headers["retry-after"]) <= 86400
    guard.hold("b0", ["pricey"], bounds, None, gate.scopes(bob))  # the team's third
    with pytest.raises(ApiError) as err:  # the team's budget refuses bob's second
        guard.hold("b1", ["pricey"], bounds, None, gate.scopes(bob))
    assert "team 'ml'" in err.value.message
    dave, _ = store.create_key("dave", budget_usd=10 * bound, team="ml")
    with pytest.raises(ApiError, match="team 'ml'"):  # dave's own budget fits, his team's does not
        guard.hold("d0", ["pricey"], bounds, None, gate.scopes(dave))
    ledger = store.ledger
    assert ledger.reserved(session=f"key:{dave.id}") == 0  # the key's hold was released again
    assert ledger.reserved(session=f"key:{alice.id}") == pytest.approx(2 * bound)
    assert ledger.reserved(session="team:ml") == pytest.approx(3 * bound)
    # settling books the real bill in every scope, which frees the rest of the bound
    guard.settle("a0", gate.scopes(alice), bound / 4, "pricey")
    assert ledger.spent(session=f"key:{alice.id}") == pytest.approx(bound / 4)
    assert ledger.spent(session="team:ml") == pytest.approx(bound / 4)
    guard.hold("b1", ["pricey"], bounds, None, gate.scopes(bob))
    # the proxy's own cap is a scope too, and the tightest one names itself
    with pytest.raises(ApiError) as err:
        guard.hold("c0", ["cheap"], [bound], cap=bound / 2, scopes=gate.scopes(store.create_key("carol")[0]))
    assert "the proxy's" in err.value.message
    usage = key_usage(store, alice)
    assert usage["spent_usd"] == pytest.approx(bound / 4) and usage["held_usd"] == pytest.approx(bound)
    assert usage["team_budget_usd"] == pytest.approx(3.5 * bound)


def test_authenticate_refuses_missing_unknown_and_revoked_keys(store):
    gate = KeyGate(store)
    key, secret = store.create_key("alice")
    assert gate.authenticate(f"Bearer {secret}") == key
    for header, says in (("", "missing"), ("Bearer sk-other", "invalid"), (f"Bearer {secret}x", "invalid")):
        with pytest.raises(ApiError) as err:
            gate.authenticate(header)
        assert err.value.status == 401 and says in err.value.message
        assert err.value.body()["error"]["code"] == "invalid_api_key"
    store.revoke("alice")
    with pytest.raises(ApiError) as err:
        gate.authenticate(f"Bearer {secret}")
    assert err.value.status == 401 and "'alice' has been revoked" in err.value.message


def test_keys_cli_creates_lists_revokes_and_reports_usage(tmp_path, capsys):
    db = str(tmp_path / "k.sqlite")
    assert main(["keys", "team", "ml", "--budget-usd", "20", "--keys-db", db]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "ml", "budget_usd": 20.0, "period": "month"}
    args = [
        "keys",
        "create",
        "alice",
        "--budget-usd",
        "5",
        "--period",
        "week",
        "--rpm",
        "60",
        "--tpm",
        "9000",
    ]
    assert main([*args, "--models", "cheap, pricey", "--team", "ml", "--keys-db", db]) == 0
    created = json.loads(capsys.readouterr().out)
    secret = created["key"]
    assert (
        secret.startswith("rml-") and created["models"] == ["cheap", "pricey"] and created["period"] == "week"
    )
    assert main(["keys", "list", "--keys-db", db]) == 0
    listed = capsys.readouterr().out
    assert secret not in listed and hash_secret(secret) not in listed and '"alice"' in listed
    assert main(["keys", "usage", "alice", "--keys-db", f"sqlite:{db}"]) == 0
    usage = json.loads(capsys.readouterr().out)[0]
    assert usage["spent_usd"] == 0 and usage["rpm"] == 60 and usage["team_budget_usd"] == 20
    assert main(["keys", "revoke", "alice", "--keys-db", db]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] is not None
    assert main(["keys", "revoke", "nobody", "--keys-db", db]) == 2
    assert "no key named 'nobody'" in capsys.readouterr().err
    assert main(["keys", "create", "x", "--period", "fortnight", "--keys-db", db]) == 2
    assert "'fortnight'" in capsys.readouterr().err
    with open_key_store(db) as s:
        assert not s.get_key("alice").active


def test_the_key_store_may_not_be_the_spend_ledger(tmp_path):
    assert _same_file(f"sqlite:{tmp_path}/a.sqlite", str(tmp_path / "a.sqlite"))
    assert not _same_file("memory", "memory")
    assert not _same_file(str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite"))
    assert not _same_file("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0")  # namespaces differ
