"""Virtual API keys: per-key and per-team budgets, requests- and tokens-per-minute limits, allowed
models.

- :mod:`.records`: :class:`ApiKey`, :class:`Team`, secrets (``rml-...``, shown once) and their SHA-256.
- :mod:`.window`: the rate limits (a sliding-window log over the last minute).
- :mod:`.sqlite_store` (one proxy) and :mod:`.redis_store` (replicas): keys, teams, rate windows and
  the keys' spend, a spend ledger whose sessions are ``key:<id>`` and ``team:<name>``.
- :mod:`.gate`: what the proxy does with a key on each request.

``router-ml keys create|list|revoke|usage|team`` manages a store; ``router-ml serve --keys-db`` reads it.
"""

from __future__ import annotations

import os
from typing import Any

from router_ml.decision.ledger import period_start
from router_ml.serving.keys.gate import KeyGate
from router_ml.serving.keys.records import ApiKey, Team, hash_secret, new_secret
from router_ml.serving.keys.window import RATE_WINDOW_S, RateVerdict

__all__ = ["RATE_WINDOW_S", "ApiKey", "KeyGate", "RateVerdict", "Team", "hash_secret", "key_usage",
           "new_secret", "open_key_store"]  # fmt: skip


def open_key_store(spec: str | os.PathLike) -> Any:
    """A key store from a config value: ``"redis://..."`` -> :class:`RedisKeyStore` (replicas);
    ``"sqlite:<path>"`` or a plain path -> :class:`SqliteKeyStore`."""
    text = os.fspath(spec).strip()
    if not text:
        raise ValueError("key store spec is empty: give a path, 'sqlite:<path>' or 'redis://...'")
    if text.startswith(("redis://", "rediss://", "unix://")):
        from router_ml.serving.keys.redis_store import RedisKeyStore

        return RedisKeyStore(text)
    from router_ml.serving.keys.sqlite_store import SqliteKeyStore

    if text.startswith("sqlite:"):
        text = text[len("sqlite:") :]
    return SqliteKeyStore(text)


def key_usage(store: Any, key: ApiKey, now: float | None = None) -> dict[str, Any]:
    """What ``keys usage`` prints for one key: spend and holds in its budget period (and its
    team's), requests and tokens in the last minute, against the limits."""
    ledger = store.ledger
    session = f"key:{key.id}"
    requests, tokens = store.rate_usage(key, now)
    out: dict[str, Any] = {
        "name": key.name,
        "id": key.id,
        "active": key.active,
        "period": key.period,
        "spent_usd": ledger.spent(since=period_start(key.period, now), session=session),
        "held_usd": ledger.reserved(session=session, now=now),
        "budget_usd": key.budget_usd,
        "requests_last_minute": requests,
        "rpm": key.rpm,
        "tokens_last_minute": tokens,
        "tpm": key.tpm,
        "team": key.team,
    }
    team = store.team(key.team) if key.team else None
    if team is not None:
        tsession = f"team:{team.name}"
        out["team_spent_usd"] = ledger.spent(since=period_start(team.period, now), session=tsession)
        out["team_budget_usd"], out["team_period"] = team.budget_usd, team.period
    return out
