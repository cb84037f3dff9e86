"""What the proxy does with a virtual key on each request: authenticate it, keep it to its models,
admit it under its rate limits, and name its budgets (the key's, its team's) as reservation scopes.

The engine (:meth:`~router_ml.serving.engine.RoutingEngine.complete`) calls, in order:
:meth:`KeyGate.authenticate` (401 for a missing, unknown or revoked key), :meth:`KeyGate.allows`
(403 for a pass-through to a model the key may not reach; a routed request is routed among the
key's models only), :meth:`KeyGate.admit` (429 ``rate_limit_exceeded`` past ``rpm``/``tpm``, with
``Retry-After``), then the budget scopes of :meth:`KeyGate.scopes` are held with the proxy's own cap
by :meth:`~router_ml.serving.budget.SpendGuard.hold` (429 ``budget_exhausted``). A finished call
settles them all with the real bill and token usage; a failed one releases them.

Every limit comes from the store, written by the operator (``router-ml keys``): no request field
can lift it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from router_ml.decision.ledger import LedgerError
from router_ml.serving.budget import BudgetScope
from router_ml.serving.keys.records import SECRET_PREFIX, ApiKey
from router_ml.serving.openai_errors import ApiError


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


class KeyGate:
    """The proxy's view of a key store (:class:`~router_ml.serving.keys.SqliteKeyStore` or
    :class:`~router_ml.serving.keys.RedisKeyStore`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"KeyGate({self.store!r})"

    def _down(self, e: Exception) -> ApiError:
        return ApiError(503, f"the key store cannot be reached, so no call is made: {e}",
                        type="api_error", code="key_store_unavailable")  # fmt: skip

    def authenticate(self, header: str) -> ApiKey:
        """The key of an ``Authorization: Bearer <secret>`` header; a 401 otherwise."""
        secret = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not secret:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if not secret.startswith(SECRET_PREFIX):
            raise _unauthorized("invalid API key")
        try:
            key = self.store.key_by_secret(secret)
        except LedgerError as e:
            raise self._down(e) from None
        if key is None:
            raise _unauthorized("invalid API key")
        if not key.active:
            raise _unauthorized(f"API key {key.name!r} has been revoked")
        return key

    @staticmethod
    def forbidden(key: ApiKey, model: str) -> ApiError:
        allowed = ", ".join(key.models)
        return ApiError(
            403, f"API key {key.name!r} may not use model {model!r}; it may use: {allowed}",
            type="permission_error", param="model", code="model_not_allowed",
        )  # fmt: skip

    def scopes(self, key: ApiKey) -> list[BudgetScope]:
        """The budgets a request of ``key`` reserves against: the key's own, then its team's (with
        no budget, a scope only books the spend, for ``keys usage``)."""
        out = [BudgetScope(f"key {key.name!r}'s", self.store.ledger, key.budget_usd, key.period,
                           f"key:{key.id}", "|key")]  # fmt: skip
        if key.team is not None:
            try:
                team = self.store.team(key.team)
            except LedgerError as e:
                raise self._down(e) from None
            budget, period = (None, "month") if team is None else (team.budget_usd, team.period)
            out.append(BudgetScope(f"team {key.team!r}'s", self.store.ledger, budget, period,
                                   f"team:{key.team}", "|team"))  # fmt: skip
        return out

    def limited(self, key: ApiKey) -> bool:
        """True when requests of ``key`` have a rate limit to pass."""
        return key.rpm is not None or key.tpm is not None

    def admit(self, key: ApiKey, request_id: str, tokens: int) -> None:
        """Admit the request (``tokens``: its token bound) under the key's limits; a 429 otherwise."""
        try:
            v = self.store.admit_rate(key, request_id, tokens)
        except LedgerError as e:
            raise self._down(e) from None
        if v.ok:
            return
        if v.limit == "rpm":
            what = f"{key.rpm} requests per minute"
        elif v.retry_after_s is None:
            what = f"{key.tpm} tokens per minute, which this request's bound of {tokens} tokens alone exceeds"
        else:
            what = f"{key.tpm} tokens per minute (this request may use up to {tokens})"
        headers = {} if v.retry_after_s is None else {"retry-after": str(max(1, math.ceil(v.retry_after_s)))}
        raise ApiError(429, f"rate limit exceeded: API key {key.name!r} allows {what}",
                       type="rate_limit_error", code="rate_limit_exceeded", headers=headers)  # fmt: skip

    def settle(self, key: ApiKey, request_id: str, tokens: int) -> None:
        """The finished request's actual tokens replace its bound in the key's window."""
        if self.limited(key):
            with contextlib.suppress(LedgerError):  # the bound stays: a tighter limit, never a looser
                self.store.settle_rate(key, request_id, tokens)

    def release(self, key: ApiKey, request_id: str) -> None:
        """A request that reached no backend leaves the key's window."""
        if self.limited(key):
            with contextlib.suppress(LedgerError):
                self.store.release_rate(key, request_id)
