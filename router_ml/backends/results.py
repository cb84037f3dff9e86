"""What a backend call ends in: the errors a caller catches, the :class:`ChatResult` it reads, and the
state one call carries across retries and fallbacks (shared by the client, transport and streams)."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from router_ml.backends.catalog import Backend

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})  # 529: Anthropic overloaded


class BackendError(Exception):
    """A failed backend call: ``backend``, ``status`` (HTTP, None for transport errors), ``retryable``."""

    def __init__(
        self,
        backend: str,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"backend {backend!r}: {message}")
        self.backend = backend
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class BadRequest(BackendError):
    """The upstream rejected the request (4xx other than 408/409/429): never retried or re-routed."""


class BackendTimeout(BackendError):
    """No first token (or no answer) within the backend's deadline."""


class CircuitOpen(BackendError):
    """The backend is cooling down after repeated failures; no request was sent."""


class StreamInterrupted(BackendError):
    """A stream broke after content was sent and there was nowhere to resume; ``partial`` was sent."""

    def __init__(self, backend: str, message: str, partial: str, **kw: Any) -> None:
        super().__init__(backend, message, **kw)
        self.partial = partial


class AllBackendsFailed(BackendError):
    """Every backend of a fallback chain failed or was skipped; ``errors`` says why, in order."""

    def __init__(self, chain: Sequence[str], errors: Sequence[str], last: BackendError | None) -> None:
        status = last.status if last is not None and last.status is not None else 503
        super().__init__(" -> ".join(chain), "all backends failed: " + "; ".join(errors), status=status)
        self.chain, self.errors, self.last = list(chain), list(errors), last


# ----------------------------------------------------------------------------------------- results
@dataclass
class ChatResult:
    """One finished answer. ``ttft_s`` / ``latency_s`` count from the start of the call (retries and
    fallbacks included); ``ttft_s`` is None for non-stream calls. ``usage_source``: "upstream" or
    "counted" (tokenizer); ``tried``: backends a request was sent to, in order; ``errors``: why the
    ones before ``backend`` were left. ``cached_tokens`` / ``cache_write_tokens``: of the prompt
    tokens, those the provider read from / wrote to its prompt cache (priced apart)."""

    backend: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    tokens_per_s: float | None
    cost_usd: float | None
    attempts: int
    raw: dict[str, Any] | None = None
    usage_source: str = "upstream"
    tried: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cached_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass
class _CallState:
    t0: float
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    last_error: BackendError | None = None
    servers: set[str] = field(default_factory=set)  # server_key() of every backend tried


# ------------------------------------------------------------------------------------------ helpers
def server_key(backend: Backend) -> str:
    """The server a backend reaches: its base URL, lower-cased, without a trailing ``/`` (two
    catalog entries with the same key are one server, or one launch)."""
    return backend.base_url.rstrip("/").lower()


async def _within(aw: Awaitable[T], seconds: float) -> T:
    """``await aw`` or raise ``asyncio.TimeoutError`` after ``seconds``."""
    if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per call
        async with asyncio.timeout(seconds):
            return await aw
    return await asyncio.wait_for(aw, seconds)


def cache_tokens(usage: Any) -> tuple[int, int]:
    """(prompt tokens read from the provider's cache, prompt tokens written to it) of an OpenAI-style
    ``usage``: ``prompt_tokens_details.cached_tokens`` (OpenAI, Azure, and Anthropic's
    ``cache_read_input_tokens`` once translated) and ``cache_creation_input_tokens`` (Anthropic)."""
    if not isinstance(usage, dict):
        return 0, 0
    details = usage.get("prompt_tokens_details")
    read = details.get("cached_tokens") if isinstance(details, dict) else None
    write = usage.get("cache_creation_input_tokens")
    return (read if isinstance(read, int) and read > 0 else 0), (
        write if isinstance(write, int) and write > 0 else 0
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/invalid."""
    if not value:
        return None
    try:
        secs = float(value)
        return secs if math.isfinite(secs) and secs >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def transport_error(backend: Backend, err: httpx.HTTPError) -> BackendError:
    what = type(err).__name__
    if isinstance(err, httpx.ConnectTimeout):
        return BackendTimeout(
            backend.name, f"{what}: no connection within {backend.connect_timeout_s:g} s", retryable=True
        )
    if isinstance(err, httpx.TimeoutException):  # a read stalled longer than first_token_timeout_s
        return BackendTimeout(
            backend.name, f"{what}: no data for {backend.first_token_timeout_s:g} s", retryable=True
        )
    if isinstance(err, httpx.TransportError):
        return BackendError(backend.name, f"{what}: {err}", retryable=True)
    return BackendError(backend.name, f"{what}: {err}")
