"""Virtual API keys end to end: a real trained router, real loopback backends, the real app under
uvicorn, a real SQLite key store, and the official ``openai`` client (401, 403, routing among a
key's models, 429 on rate limits and budgets with Retry-After, a request that cannot lift a key's
budget, and per-key figures on ``/metrics``)."""

from __future__ import annotations

import os

import httpx
import pytest

from router_ml.serving.keys import KeyGate, Team
from router_ml.serving.keys.sqlite_store import SqliteKeyStore
from router_ml.serving.proxy import ProxySettings, create_app
from tests.test_proxy import Served, _catalog, _engine, _eventually, backends, router  # noqa: F401

openai = pytest.importorskip("openai")

MSG = [{"role": "user", "content": "Write a long, moving poem about the sea at night."}]


@pytest.fixture(scope="module")
def keyed(router, backends, tmp_path_factory):  # noqa: F811
    os.environ["ROUTER_ML_TEST_BIG_KEY"] = "sk-test-" + "x" * 32
    store = SqliteKeyStore(tmp_path_factory.mktemp("keys") / "keys.sqlite")
    engine = _engine(router, _catalog(*backends), keys=KeyGate(store))
    with Served(create_app(engine)) as url:
        yield url, store
    store.close()


def _client(url: str, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)


def test_missing_unknown_and_revoked_keys_get_401(keyed):
    url, store = keyed
    _, secret = store.create_key("carol")
    assert _client(url, secret).chat.completions.create(model="fast", messages=MSG).model == "fast"
    store.revoke("carol")
    for api_key, says in (("rml-unknown", "invalid API key"), (secret, "'carol' has been revoked")):
        with pytest.raises(openai.AuthenticationError) as err:
            _client(url, api_key).chat.completions.create(model="fast", messages=MSG)
        assert says in str(err.value) and err.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "fast", "messages": MSG})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_a_key_reaches_only_its_models(keyed):
    url, store = keyed
    _, secret = store.create_key("alice", models=("fast",))
    client = _client(url, secret)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="big", messages=MSG)
    assert "may not use model 'big'" in str(err.value) and err.value.body["code"] == "model_not_allowed"
    # routed: the best model for a poem at no price would be big; alice's requests stay on fast
    _, free = store.create_key("free")
    unbounded = _client(url, free).chat.completions.with_raw_response.create(
        model="router:utility:0", messages=MSG
    )
    assert unbounded.headers["x-router-served-model"] == "big"
    raw = client.chat.completions.with_raw_response.create(model="router:utility:0", messages=MSG)
    assert raw.parse().model == raw.headers["x-router-served-model"] == "fast"
    assert "API key 'alice' excluded big" in raw.headers["x-router-reason"]
    assert raw.headers["x-router-fallbacks"].split(",") != ["big"]


def test_past_the_rate_limit_a_429_with_retry_after(keyed):
    url, store = keyed
    _, secret = store.create_key("bursty", rpm=3)
    client = _client(url, secret)
    for _ in range(3):
        client.chat.completions.create(model="fast", messages=MSG)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="fast", messages=MSG)
    body = err.value.body
    assert (body["type"], body["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "'bursty' allows 3 requests per minute" in body["message"]
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    # tokens per minute: the request's bound (input + max_tokens) counts
    _, secret = store.create_key("wordy", tpm=200)
    with pytest.raises(openai.RateLimitError, match="200 tokens per minute"):
        _client(url, secret).chat.completions.create(model="fast", messages=MSG, max_tokens=500)
    assert _client(url, secret).chat.completions.create(model="fast", messages=MSG, max_tokens=50).usage


def test_a_stream_settles_the_keys_tokens_and_spend(keyed):
    url, store = keyed
    key, secret = store.create_key("streamer", tpm=100_000, budget_usd=1.0)
    chunks = list(
        _client(url, secret).chat.completions.create(model="fast", messages=MSG, max_tokens=200, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    requests, tokens = store.rate_usage(key)
    assert requests == 1 and 0 < tokens < 200  # the bound (input + 200) was replaced by the usage
    assert (
        store.ledger.spent(session=f"key:{key.id}") > 0
        and store.ledger.reserved(session=f"key:{key.id}") == 0
    )


def test_no_request_lifts_a_key_or_team_budget(keyed, backends):  # noqa: F811
    url, store = keyed
    store.set_team(Team("ml", budget_usd=2e-3, period="day"))
    key, secret = store.create_key("dave", budget_usd=1e-3, period="day", team="ml")
    headers = {"authorization": f"Bearer {secret}"}
    # a budgeted policy with a huge per-request budget, and pass-through to the pricey backend
    bodies = [{"model": m, "messages": MSG, "max_tokens": 16} for m in ("router:cost_aware:1e6", "big") * 12]
    replies = _post_all_with(url, bodies, headers)
    served = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert served and refused and len(served) + len(refused) == len(bodies)
    err = refused[0].json()["error"]
    assert err["code"] == "budget_exhausted" and "key 'dave'" in err["message"]
    assert 1 <= int(refused[0].headers["retry-after"]) <= 86400
    assert _eventually(lambda: store.ledger.reserved(session=f"key:{key.id}") == 0)  # last booking may trail
    spent = store.ledger.spent(session=f"key:{key.id}")
    assert 0 < spent <= 1e-3
    assert store.ledger.spent(session="team:ml") == pytest.approx(spent)
    metrics = httpx.get(f"{url}/metrics").text
    assert (
        f'router_ml_key_requests_total{{key="dave",key_id="{key.id}",status="429"}} {len(refused)}.0'
        in metrics
    )
    line = next(
        x for x in metrics.splitlines() if x.startswith("router_ml_key_spend_usd_total") and '"dave"' in x
    )
    assert float(line.split()[-1]) == pytest.approx(spent) and 'team="ml"' in line
    assert secret not in metrics and key.secret_hash not in metrics


def _post_all_with(url: str, bodies: list[dict], headers: dict) -> list[httpx.Response]:
    import asyncio

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=headers) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=b) for b in bodies))

    return asyncio.run(go())


def test_keys_and_a_single_proxy_key_are_exclusive(router, backends, tmp_path):  # noqa: F811
    os.environ["ROUTER_ML_TEST_PROXY_KEY"] = "sk-x"
    with SqliteKeyStore(tmp_path / "k.sqlite") as store:
        engine = _engine(router, _catalog(*backends), keys=KeyGate(store))
        with pytest.raises(ValueError, match="not both"):
            create_app(engine, ProxySettings(api_key_env="ROUTER_ML_TEST_PROXY_KEY"))
