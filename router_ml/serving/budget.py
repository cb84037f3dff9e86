"""The operator's spend cap, enforced before every backend call by a reservation in the ledger.

A request, routed or pass-through, may go to a backend only once it has **reserved its cost bound**
in the shared ledger: its input tokens (counted with each backend's tokenizer, plus a few per
message for the chat template) times the input price, plus its most output tokens times the output
price, the largest over its fallback chain (a fallback may be pricier). The most output tokens are
the request's ``max_tokens``/``max_completion_tokens``, else the decision's or the backend's
``max_tokens``, else ``default_max_tokens``, which is then written into the payload so that the
backend cannot run past the bound. The ledger checks ``spent + reserved + bound <= cap`` and holds
the bound in one atomic step (:meth:`~router_ml.decision.ledger.MemoryLedger.reserve`); the engine
settles the hold with the real bill when it books the call, releases it when the call fails, and a
hold left by a crashed replica lapses after ``ttl_s``. A request that does not fit is refused with a
429 ``insufficient_quota``/``budget_exhausted`` (and ``Retry-After``: the seconds until the period
starts again).

The cap is the smaller of the operator's ``budget_usd`` per ``period`` and the hard cap of a
budgeted policy (``cost_aware``), itself only ever tightened by a request.

Further budgets are further scopes (:class:`BudgetScope`) of the same reserve -> settle -> release: a
virtual API key's and its team's (:mod:`~router_ml.serving.keys`), each a session of the key store's
ledger. :meth:`SpendGuard.hold` holds the bound in every scope (each check-and-hold atomic in its
ledger; a refusal releases the holds already taken), :meth:`SpendGuard.settle` books the bill in
each, :meth:`SpendGuard.release` drops them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router_ml.backends.prompt_tokens import template_dir
from router_ml.decision.ledger import LedgerError, period_start
from router_ml.decision.ledger.records import RESERVATION_TTL_S
from router_ml.serving.openai_errors import ApiError

# tokens a chat template adds per message (role markers, separators): generous, since it is a bound
TEMPLATE_TOKENS_PER_MESSAGE = 8
_PERIOD_STEP_S = {"hour": 3600, "day": 86400, "week": 7 * 86400, "month": 32 * 86400}


def messages_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Every text the messages carry (contents, text parts, tool-call arguments), one per line."""
    out: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                out.extend(str(fn.get(k) or "") for k in ("name", "arguments"))
    return "\n".join(out)


def seconds_to_next_period(period: str, now: float | None = None) -> float | None:
    """Seconds until the budget ``period`` containing ``now`` ends (None for "session")."""
    now = time.time() if now is None else now
    start = period_start(period, now)
    if start is None:
        return None
    nxt = period_start(period, start + _PERIOD_STEP_S[period])
    return max(0.0, float(nxt) - now)


@dataclass(frozen=True)
class BudgetScope:
    """One budget a request reserves against: ``cap_usd`` per ``period`` over ``session`` of
    ``ledger``. The proxy's cap is one; a virtual key's and its team's budgets are others
    (:mod:`~router_ml.serving.keys`). Scopes sharing one ledger hold under distinct ids
    (``request_id + suffix``)."""

    label: str  # how the 429 names it: "the proxy's", "key 'alice''s"
    ledger: Any
    cap_usd: float | None  # None: no cap, the spend is only booked (a key's usage)
    period: str
    session: str | None
    suffix: str = ""

    def hold_id(self, request_id: str) -> str:
        return request_id + self.suffix


class SpendGuard:
    """Reservations of the calls' cost bounds against the spend cap, in ``ledger``.

    ``budget_usd``: the operator's cap per ``period`` (None: only the policies' own caps);
    ``session``: the ledger session the cap covers (None: every session); ``client``: prices and
    token counts per backend (:class:`~router_ml.backends.client.BackendClient`).
    """

    def __init__(
        self,
        ledger: Any,
        client: Any,
        budget_usd: float | None = None,
        period: str = "day",
        session: str | None = None,
        default_max_tokens: int = 1024,
        ttl_s: float = RESERVATION_TTL_S,
    ) -> None:
        if budget_usd is not None and not (math.isfinite(budget_usd) and budget_usd >= 0):
            raise ValueError(f"budget_usd must be a finite number >= 0, got {budget_usd!r}")
        if not (isinstance(default_max_tokens, int) and default_max_tokens > 0):
            raise ValueError(f"default_max_tokens must be a positive integer, got {default_max_tokens!r}")
        period_start(period)  # validates the name
        self.ledger, self.client, self.budget_usd = ledger, client, budget_usd
        self.period, self.session = period, session
        self.default_max_tokens, self.ttl_s = default_max_tokens, float(ttl_s)

    def cap(self, layer: Any | None, constraints: Mapping[str, Any]) -> float | None:
        """The cap a request reserves against: min(operator budget, its policy's hard cap)."""
        caps = [self.budget_usd]
        if layer is not None:
            caps.append(layer.spend_cap(constraints))
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    def bounds(
        self, chain: Sequence[str], payload: dict[str, Any], messages: Sequence[Mapping]
    ) -> list[float]:
        """The cost bound of the request on each backend of ``chain`` (USD); writes the default
        ``max_tokens`` into ``payload`` when neither it nor the backend sets one."""
        return self.plan(chain, payload, messages)[0]

    def plan(
        self, chain: Sequence[str], payload: dict[str, Any], messages: Sequence[Mapping]
    ) -> tuple[list[float], int]:
        """``(cost bound per backend of chain in USD, token bound)``: the token bound is the most
        input tokens over the chain's tokenizers (+ a generous template allowance, or the model's own
        chat template where its tokenizer is on disk, whichever is more) plus the most output tokens,
        what a tokens-per-minute limit admits. Writes the default ``max_tokens`` into ``payload``
        when neither it nor the backend sets one."""
        out_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if not out_tokens:
            out_tokens = self.client.catalog.get(chain[0]).spec.max_tokens or self.default_max_tokens
            payload["max_tokens"] = int(out_tokens)
        text = messages_text(messages)
        overhead = TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
        counted: dict[Any, int] = {}  # prompt tokens, one count per distinct tokenizer and template
        bounds = []
        for name in chain:
            backend = self.client.catalog.get(name)
            template = template_dir(backend)
            key = (backend.spec.tokenizer, backend.spec.kind, template)
            if key not in counted:
                counted[key] = self.client.count_tokens(backend, text) + overhead
                if template is not None:  # a model's own template may add more (a default system prompt)
                    counted[key] = max(
                        counted[key], self.client.count_prompt(backend, {"messages": messages})
                    )
            prompt = counted[key]
            cost = self.client.cost(name, prompt, int(out_tokens))
            if cost is not None and backend.cache_write_per_mtok is not None:
                # a provider may bill every prompt token as written to its cache (Anthropic: 1.25x)
                cost = max(cost, self.client.cost(name, prompt, int(out_tokens), 0, prompt) or 0.0)
            bounds.append(float(cost) if cost is not None else 0.0)
        return bounds, max(counted.values()) + int(out_tokens)

    def reserve(
        self,
        request_id: str,
        chain: list[str],
        payload: dict[str, Any],
        messages: Sequence[Mapping],
        cap: float | None,
        scopes: Sequence[BudgetScope] = (),
    ) -> tuple[list[str], float]:
        """Hold the request's bound over ``chain``; ``(chain, bound)`` (:meth:`hold` with the
        bounds of :meth:`plan`)."""
        return self.hold(request_id, chain, self.plan(chain, payload, messages)[0], cap, scopes)

    def scope(self, cap: float) -> BudgetScope:
        """The operator's cap as a :class:`BudgetScope` of this guard's ledger."""
        return BudgetScope("the proxy's", self.ledger, cap, self.period, self.session)

    def hold(
        self,
        request_id: str,
        chain: list[str],
        bounds: Sequence[float],
        cap: float | None,
        scopes: Sequence[BudgetScope] = (),
    ) -> tuple[list[str], float]:
        """Hold the request's bound over ``chain`` in every scope: ``scopes`` (a key's and its
        team's budgets), then the proxy's ``cap`` (None: none); ``(chain, bound)``. When the whole
        chain does not fit but the backends no pricier than the first do, the chain is cut to
        those. Each scope's check-and-hold is atomic (its ledger's :meth:`reserve`); when a later
        scope refuses, the earlier holds are released. A 429 :class:`ApiError` naming the scope
        that refused when nothing fits; a 503 when a ledger cannot be reached (the cap cannot be
        checked, so nothing is spent)."""
        every = [*scopes, *([self.scope(cap)] if cap is not None else [])]
        tries = [(chain, max(bounds))]
        cheaper = [n for n, b in zip(chain, bounds, strict=True) if b <= bounds[0]]
        if len(cheaper) < len(chain):
            tries.append((cheaper, bounds[0]))
        refused = every[-1] if every else None
        for names, bound in tries:
            held: list[BudgetScope] = []
            try:
                for sc in every:
                    if sc.cap_usd is None:
                        continue
                    if not sc.ledger.reserve(
                        sc.hold_id(request_id), bound, sc.cap_usd, since=period_start(sc.period),
                        session=sc.session, ttl_s=self.ttl_s,
                    ):  # fmt: skip
                        refused = sc
                        break
                    held.append(sc)
                else:
                    return names, bound
            except LedgerError as e:
                self.release(request_id, held)
                raise ApiError(503, f"the spend ledger cannot be reached, so no call is made: {e}",
                               type="api_error", code="ledger_unavailable") from None  # fmt: skip
            self.release(request_id, held)
        assert refused is not None
        wait = seconds_to_next_period(refused.period)
        raise ApiError(
            429,
            f"budget exhausted: this request may cost up to ${bounds[0]:.6f} and {refused.label} "
            f"${refused.cap_usd:g} budget of the {refused.period} is spent or held by calls in flight",
            type="insufficient_quota",
            code="budget_exhausted",
            headers={} if wait is None else {"retry-after": str(max(1, math.ceil(wait)))},
        )

    def settle(self, request_id: str, scopes: Sequence[BudgetScope], cost_usd: float, model: str) -> None:
        """Book a finished call's bill in each of ``scopes`` (settling their holds); the proxy's
        own scope is booked by the engine with the decision."""
        for sc in scopes:
            sc.ledger.record(cost_usd, model, request_id=sc.hold_id(request_id), session=sc.session)

    def release(self, request_id: str, scopes: Sequence[BudgetScope] | None = None) -> None:
        """Drop the holds of a call that failed: in ``scopes``, or (None) the proxy's own (a ledger
        that cannot be reached lets them lapse)."""
        for ledger, rid in (
            [(self.ledger, request_id)]
            if scopes is None
            else [(s.ledger, s.hold_id(request_id)) for s in scopes]
        ):
            with contextlib.suppress(LedgerError):
                ledger.release(rid)
