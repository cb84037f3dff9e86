"""How fast and how far a collection may go: per-backend concurrency and rate limits, the run's spend cap.

Limits come from the collect config (``conf/collect/*.yaml``)::

    concurrency: 8          # calls in flight per backend (the default for every backend)
    rate: null              # requests per time: 10 (per second), "10/s", "600/min", "20000/h"
    limits:                 # per backend, overriding the defaults above
      gpt-4o: {concurrency: 16, rate: 500/min}

The spend cap reserves each call's cost bound before it is sent and settles it with the bill after
(:class:`SpendCap`): spent + reserved never exceeds the cap, so the run never crosses it as long
as no bill exceeds its bound (:func:`cost_bound` makes the bound hold for every tokenizer that
spends at least one byte of text per token).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter

from router_ml.decision.spec import ModelSpec

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PERIOD_S = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
LIMIT_KEYS = ("concurrency", "rate")


class LimitConfigError(ValueError):
    """A bad concurrency, rate or spend setting; the message names the backend and the field."""


def parse_rate(value: Any, where: str) -> float | None:
    """Requests per second from ``10``, ``"10/s"``, ``"600/min"`` or ``"20000/h"``; None = no limit."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise LimitConfigError(f"{where}: field 'rate' = {value!r} must be a number or 'N/s', 'N/min', 'N/h'")
    if isinstance(value, (int, float)):
        per_s = float(value)
    else:
        match = _RATE.match(str(value))
        if not match:
            raise LimitConfigError(
                f"{where}: field 'rate' = {value!r} must be a number (per second) or 'N/s', 'N/min', 'N/h'"
            )
        per_s = float(match.group(1)) / _PERIOD_S[match.group(2)]
    if not (math.isfinite(per_s) and per_s > 0):
        raise LimitConfigError(f"{where}: field 'rate' = {value!r} must be > 0")
    return per_s


@dataclass(frozen=True)
class BackendLimit:
    """``concurrency``: calls in flight at most; ``rate``: requests per second at most (None: none)."""

    concurrency: int
    rate: float | None = None

    def limiter(self) -> AsyncLimiter | None:
        """A leaky bucket for ``rate`` (bursts of at most one second's worth, or of one request)."""
        if self.rate is None:
            return None
        if self.rate >= 1:
            return AsyncLimiter(self.rate, 1.0)
        return AsyncLimiter(1, 1.0 / self.rate)


def _limit(raw: Mapping[str, Any], base: BackendLimit | None, where: str) -> BackendLimit:
    unknown = sorted(set(raw) - set(LIMIT_KEYS))
    if unknown:
        raise LimitConfigError(f"{where}: unknown field(s) {unknown}; allowed: {list(LIMIT_KEYS)}")
    conc = raw.get("concurrency", base.concurrency if base else None)
    if isinstance(conc, bool) or not isinstance(conc, int) or conc < 1:
        raise LimitConfigError(f"{where}: field 'concurrency' = {conc!r} must be an integer >= 1")
    rate = parse_rate(raw["rate"], where) if "rate" in raw else (base.rate if base else None)
    return BackendLimit(conc, rate)


def backend_limits(
    models: Sequence[str], cfg: Mapping[str, Any], where: str = "collect config"
) -> dict[str, BackendLimit]:
    """The limit of each of ``models`` from ``cfg`` (``concurrency``, ``rate``, ``limits``);
    ``limits`` entries of backends left out of this run are checked, then ignored."""
    default = _limit(
        {k: cfg[k] for k in LIMIT_KEYS if k in cfg} | {"concurrency": cfg.get("concurrency", 8)}, None, where
    )
    per = cfg.get("limits") or {}
    if not isinstance(per, Mapping):
        raise LimitConfigError(f"{where}: field 'limits' must map backend names to {{concurrency, rate}}")
    out = {m: default for m in models}
    for name, raw in per.items():
        if not isinstance(raw, Mapping):
            raise LimitConfigError(f"{where}: limits.{name} must be a mapping with keys {list(LIMIT_KEYS)}")
        limit = _limit(raw, default, f"{where}: limits.{name}")
        if name in out:
            out[name] = limit
    return out


def cost_bound(
    spec: ModelSpec, prompt_bytes: int, max_tokens: int, template_tokens: int = 64
) -> tuple[float, int, int]:
    """(USD, input tokens, output tokens): the most a call can bill. Input: the prompt's UTF-8 bytes
    (no tokenizer spends less than a byte per token) plus ``template_tokens`` of chat template, at
    most the context window; output: ``max_tokens``."""
    tokens_in = prompt_bytes + template_tokens
    if spec.context_window is not None:
        tokens_in = min(tokens_in, spec.context_window)
    price_in, price_out = spec.prices()
    return (tokens_in * price_in + max_tokens * price_out) / 1e6, tokens_in, max_tokens


class SpendCap:
    """The run's spend cap: reserve a call's bound before sending it, settle with its bill after.

    ``cap_usd`` None: no cap (spend is still tallied). Invariant: ``spent + reserved <= cap``.
    :meth:`reserve` waits while calls in flight hold reservations that may free room; it answers
    False once the reservation cannot fit even with nothing in flight: the cap is reached.
    ``overruns`` counts bills above their reservation (a bound that did not hold).
    """

    def __init__(self, cap_usd: float | None) -> None:
        if cap_usd is not None and (
            isinstance(cap_usd, bool) or not (math.isfinite(cap_usd) and cap_usd >= 0)
        ):
            raise LimitConfigError(f"spend_cap_usd = {cap_usd!r} must be a number >= 0 (or null: no cap)")
        self.cap_usd = None if cap_usd is None else float(cap_usd)
        self.spent = 0.0
        self.reserved = 0.0
        self.in_flight = 0
        self.reached = False
        self.overruns = 0
        self._changed = asyncio.Condition()

    def fits(self, amount: float) -> bool:
        return self.cap_usd is None or self.spent + self.reserved + amount <= self.cap_usd

    async def reserve(self, amount: float) -> bool:
        """Reserve ``amount`` USD; False when the cap is reached (then no later call is launched)."""
        async with self._changed:
            while not self.reached:
                if self.fits(amount):
                    self.reserved += amount
                    self.in_flight += 1
                    return True
                if self.in_flight == 0:
                    self.reached = True
                    self._changed.notify_all()
                    break
                await self._changed.wait()
            return False

    async def settle(self, reserved: float, billed: float) -> None:
        """Release a reservation of ``reserved`` and add the call's ``billed`` USD."""
        async with self._changed:
            self.reserved = max(0.0, self.reserved - reserved)
            self.in_flight -= 1
            self.spent += billed
            if billed > reserved + 1e-12:
                self.overruns += 1
            self._changed.notify_all()
