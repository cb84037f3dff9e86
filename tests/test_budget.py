"""SpendGuard: a request's cost bound over its fallback chain, the default max_tokens it writes in,
its reservation against the cap (chain cut to what fits, 429 with Retry-After, 503 when the ledger
is down), with the real catalog, token counters and ledgers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from router_ml.backends.catalog import Catalog
from router_ml.backends.client import BackendClient
from router_ml.decision.ledger import LedgerError, MemoryLedger
from router_ml.serving.budget import (
    TEMPLATE_TOKENS_PER_MESSAGE,
    SpendGuard,
    messages_text,
    seconds_to_next_period,
)
from router_ml.serving.openai_errors import ApiError

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "How far is the Moon?"}, {"type": "image_url"}]},
]


@pytest.fixture
def client() -> BackendClient:
    entries = [
        {"name": "cheap", "kind": "api", "base_url": "http://127.0.0.1:9/v1",
         "prices": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}, "latency": {"ttft_s": 0.1, "tokens_per_s": 100}},
        {"name": "pricey", "kind": "api", "base_url": "http://127.0.0.1:9/v1", "max_tokens": 256,
         "prices": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}, "latency": {"ttft_s": 0.1, "tokens_per_s": 100}},
    ]  # fmt: skip
    return BackendClient(Catalog.from_entries({"backends": entries}))


def _bound(client: BackendClient, name: str, out_tokens: int) -> float:
    backend = client.catalog.get(name)
    tokens = client.count_tokens(backend, messages_text(MESSAGES)) + TEMPLATE_TOKENS_PER_MESSAGE * len(
        MESSAGES
    )
    return client.cost(name, tokens, out_tokens)


def test_the_bound_is_the_largest_over_the_chain_and_the_default_max_tokens_is_written_in(client):
    guard = SpendGuard(MemoryLedger(), client, budget_usd=1.0, default_max_tokens=100)
    payload: dict = {}
    bounds = guard.bounds(["cheap", "pricey"], payload, MESSAGES)
    assert payload == {"max_tokens": 100}  # no max_tokens anywhere: the default, written in
    assert bounds == [_bound(client, "cheap", 100), _bound(client, "pricey", 100)]
    assert bounds[1] > 10 * bounds[0]
    payload = {}
    guard.bounds(["pricey", "cheap"], payload, MESSAGES)
    assert payload == {"max_tokens": 256}  # the first backend's own max_tokens
    payload = {"max_completion_tokens": 7}
    assert guard.bounds(["cheap"], payload, MESSAGES) == [_bound(client, "cheap", 7)]
    assert "max_tokens" not in payload  # the request's own cap is kept as it is
    assert "How far is the Moon?" in messages_text(MESSAGES) and "Answer briefly." in messages_text(MESSAGES)


def test_reserve_holds_cuts_the_chain_or_refuses(client):
    ledger = MemoryLedger()
    guard = SpendGuard(ledger, client, budget_usd=1.0, period="day", default_max_tokens=100)
    cheap, pricey = _bound(client, "cheap", 100), _bound(client, "pricey", 100)
    chain, held = guard.reserve("r1", ["cheap", "pricey"], {}, MESSAGES, cap=1.0)
    assert (chain, held) == (["cheap", "pricey"], pricey) and ledger.reserved() == pricey
    # the pricier fallback no longer fits, the first backend does: the chain is cut to it
    chain, held = guard.reserve("r2", ["cheap", "pricey"], {}, MESSAGES, cap=pricey + 1.5 * cheap)
    assert (chain, held) == (["cheap"], cheap)
    with pytest.raises(ApiError) as err:
        guard.reserve("r3", ["cheap"], {}, MESSAGES, cap=pricey + 1.5 * cheap)
    e = err.value
    assert e.status == 429 and e.body()["error"]["code"] == "budget_exhausted"
    assert e.type == "insufficient_quota" and 1 <= int(e.headers["retry-after"]) <= 86400
    assert ledger.reserved() == pytest.approx(pricey + cheap)  # the refused request holds nothing
    guard.release("r1")
    assert ledger.reserved() == pytest.approx(cheap)
    session = SpendGuard(MemoryLedger(), client, budget_usd=0.0, period="session")
    with pytest.raises(ApiError) as err:
        session.reserve("r4", ["cheap"], {}, MESSAGES, cap=0.0)
    assert err.value.status == 429 and "retry-after" not in err.value.headers  # a session never restarts


def test_a_ledger_that_cannot_be_reached_refuses_with_503(client):
    class DownLedger(MemoryLedger):
        def reserve(self, *a, **kw):
            raise LedgerError("redis ledger 'redis://127.0.0.1:1/0' cannot be reached")

    guard = SpendGuard(DownLedger(), client, budget_usd=1.0)
    with pytest.raises(ApiError) as err:
        guard.reserve("r", ["cheap"], {}, MESSAGES, cap=1.0)
    assert err.value.status == 503 and err.value.body()["error"]["code"] == "ledger_unavailable"
    assert "cannot be reached" in err.value.message


def test_bad_settings_are_refused(client):
    with pytest.raises(ValueError, match="budget_usd"):
        SpendGuard(MemoryLedger(), client, budget_usd=-1.0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        SpendGuard(MemoryLedger(), client, default_max_tokens=0)
    with pytest.raises(ValueError, match="'fortnight'"):
        SpendGuard(MemoryLedger(), client, period="fortnight")


def test_seconds_to_next_period():
    now = datetime(2026, 2, 27, 23, 30, tzinfo=UTC).timestamp()
    assert seconds_to_next_period("hour", now) == 1800
    assert seconds_to_next_period("day", now) == 1800
    assert seconds_to_next_period("month", now) == 1800 + 86400  # February 2026 has 28 days
    assert seconds_to_next_period("week", now) == 1800 + 2 * 86400  # Friday 27th -> Monday 2 March
    assert seconds_to_next_period("session", now) is None


def test_the_bound_covers_a_prompt_billed_as_written_to_the_providers_cache():
    entry = {"name": "claude", "kind": "api", "api": "anthropic", "base_url": "http://127.0.0.1:9",
             "max_tokens": 64, "latency": {"ttft_s": 0.1, "tokens_per_s": 100},
             "prices": {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cache_write_per_mtok": 3.75}}  # fmt: skip
    client = BackendClient(Catalog.from_entries({"backends": [entry]}))
    guard = SpendGuard(MemoryLedger(), client, budget_usd=1.0)
    tokens = client.count_tokens(client.catalog.get("claude"), messages_text(MESSAGES))
    tokens += TEMPLATE_TOKENS_PER_MESSAGE * len(MESSAGES)
    plain = client.cost("claude", tokens, 64)
    (bound,) = guard.bounds(["claude"], {}, MESSAGES)
    assert bound == pytest.approx(plain + tokens * 0.75 / 1e6) and bound > plain


def test_the_bound_counts_a_local_models_own_chat_template():
    """SmolLM2's template adds a default system prompt: 38 prompt tokens for a 9-token message, more
    than the generous per-message allowance; the bound (and the token bound) cover it."""
    from tests.test_serving_client import _smollm2_dir

    folder = _smollm2_dir()
    messages = [{"role": "user", "content": "Write three short sentences about the sea."}]
    entry = {"name": "smol", "kind": "vllm", "base_url": "http://127.0.0.1:9/v1", "tokenizer": f"hf:{folder}",
             "prices": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}, "latency": {"ttft_s": 0.1, "tokens_per_s": 100}}  # fmt: skip
    client = BackendClient(Catalog.from_entries({"backends": [entry]}))
    backend = client.catalog.get("smol")
    allowance = client.count_tokens(backend, messages_text(messages)) + TEMPLATE_TOKENS_PER_MESSAGE
    templated = client.count_prompt(backend, {"messages": messages})
    assert templated > allowance
    bounds, tokens = SpendGuard(MemoryLedger(), client).plan(["smol"], {"max_tokens": 10}, messages)
    assert tokens == templated + 10
    assert bounds == [pytest.approx(client.cost("smol", templated, 10))]
