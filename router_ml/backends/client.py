"""Async client for OpenAI-compatible backends: retries, circuit breaker, fallback chain, stream resume.

Keep-alive HTTP/1.1 connections (:mod:`router_ml.backends.http11` for plain ``http://``, ``httpx``
otherwise) talk to every backend of a :class:`~router_ml.backends.catalog.Catalog`: vLLM, llama.cpp, OpenAI, Anthropic's OpenAI-compatible
endpoint. Per call it sends ``model = served_model_id`` and the bearer key read from ``api_key_env``
(never logged), and measures client-side TTFT (first content chunk), tokens/s, usage (the
upstream's, or counted with the backend's tokenizer when a stream has none) and cost.

Failure handling, in the spirit of LiteLLM's router (retries, cooldown, fallbacks):

- **Retries** of retryable failures (connect errors, timeouts, 408/409/429/500/502/503/504, broken
  or invalid streams before the first token) with exponential backoff and jitter; ``Retry-After``
  (seconds or an HTTP date) on 429/503 is honoured up to ``retry_after_cap_s``, and trips the
  backend's circuit for that long.
- **First-token deadline**: a stream must deliver content within ``first_token_timeout_s``; a
  resumed stream within that plus the time to prefill its continuation (the prompt and the answer
  so far) at ``prefill_tokens_per_s`` (else the expected decode speed); a non-stream answer within
  ``first_token_timeout_s`` plus ``max_tokens`` decoded at half the expected speed. A hang
  becomes a retryable :class:`BackendTimeout` after that, not after the whole-request ``timeout_s``.
- **Circuit breaker** (:class:`CircuitBreaker`): ``fail_threshold`` consecutive failures open a
  backend for ``cooldown_s``; then one trial request decides.
- **Fallback** (:meth:`BackendClient.chat_with_fallback`): backends in order, skipping open
  circuits and backends whose server (base URL) this request already tried: two catalog names for
  one local server fail together, and a second try only spends the time the next server needs. A
  backend with a fallback after it is retried only for HTTP status errors (``retries_before_fallback``), never for a timeout, a refused connection or a Retry-After
  (the next backend is faster). An upstream 4xx other than 408/409/429 is a :class:`BadRequest`:
  raised at once, never retried, never sent to another backend.
- **Stream resume**: when a stream breaks after content was sent, the next backend continues the
  partial answer: for vLLM it is prefilled as the final assistant message
  (``continue_final_message: true, add_generation_prompt: false``); other servers (llama.cpp, APIs)
  are asked to continue (:data:`CONTINUE_PROMPT`) and any text they repeat is cut
  (:func:`overlap_to_strip`). The caller sees one stream without duplicated text; only choice 0 of
  a stream is tracked.

Below it, each in a module of its own: errors and results (:mod:`~router_ml.backends.results`),
streams and their resumption (:mod:`~router_ml.backends.streams`), single HTTP attempts
(:mod:`~router_ml.backends.transport`), vLLM metrics (:mod:`~router_ml.backends.vllm_metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from router_ml.backends.catalog import Backend
from router_ml.backends.results import (
    AllBackendsFailed,
    BackendError,
    BadRequest,
    ChatResult,
    CircuitOpen,
    _CallState,
    server_key,
)
from router_ml.backends.streams import (
    ChatStream,
    Resume,
    Upstream,
    _uses_prefill,
    continuation_payload,
)
from router_ml.backends.transport import HttpCalls
from router_ml.backends.vllm_metrics import scrape_vllm_metrics
from router_ml.log_repeats import limit_repeats

__all__ = ["BackendClient"]

log = limit_repeats(logging.getLogger(__name__))
T = TypeVar("T")


class BackendClient(HttpCalls):
    """Calls the backends of ``catalog``: retries, circuit breaker, fallback chain, stream resume.

    ``breaker``: a :class:`~router_ml.backends.breaker.CircuitBreaker` (default: 3 failures, 5 s
    cooldown); ``latency_model``: fed each successful call's TTFT and decode speed (streams:
    measured; non-stream: decode speed over the model's TTFT estimate); ``cost_model``: prices the
    calls (default: the catalog's pool); ``http``: an ``httpx.AsyncClient`` to use for every backend
    (default: :class:`~router_ml.backends.http11.FastHTTP` for plain ``http://`` backends when
    ``fast_http``, an own ``httpx`` client for the rest; ``plain_http="aiohttp"`` or ``"httpx"``
    swaps FastHTTP out, for measurements). Create it anywhere; the HTTP clients are
    made on first use, inside the running loop. Close it with :meth:`aclose` or ``async with``.
    """

    async def __aenter__(self) -> BackendClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----------------------------------------------------------------------------- retries
    def _retry_delay(
        self, err: BackendError, attempt: int, retries: int, can_fall_back: bool
    ) -> float | None:
        """Seconds to wait before the next attempt on the same backend; None = give up on it."""
        if not err.retryable or attempt >= retries:
            return None
        if can_fall_back and (err.status is None or err.retry_after is not None):
            return None  # a timeout, a dead server or "come back later": the next backend is faster
        if err.retry_after is not None:
            return err.retry_after if err.retry_after <= self.retry_after_cap_s else None
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * (0.5 + 0.5 * self._rng.random())

    async def _attempts(
        self,
        backend: Backend,
        op: Callable[[], Awaitable[T]],
        retries: int,
        can_fall_back: bool,
        state: _CallState,
        record_success: bool,
    ) -> T:
        name = backend.name
        if not self.breaker.allow(name):
            raise CircuitOpen(name, "circuit open: cooling down after repeated failures", status=503)
        state.tried.append(name)
        attempt = 0
        while True:
            state.attempts += 1
            try:
                out = await op()
            except BadRequest:
                self.breaker.record(name, True)  # it answered: the backend is healthy, the request is not
                raise
            except BackendError as err:
                self.breaker.record(name, False, rest_s=err.retry_after)
                delay = self._retry_delay(err, attempt, retries, can_fall_back)
                if delay is None or not self.breaker.allow(name):
                    if err.retry_after:
                        self.breaker.trip(name, err.retry_after)
                    raise
                log.info(
                    "backend %r attempt %d failed (%s); retrying in %.3f s",
                    name,
                    attempt + 1,
                    err.message,
                    delay,
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue
            if record_success:
                self.breaker.record(name, True)
            return out

    async def _walk(
        self,
        chain: Sequence[str],
        start: int,
        op: Callable[[Backend, int, bool], Awaitable[T]],
        state: _CallState,
        bad_request_stops: bool = True,
    ) -> tuple[T, int]:
        """Try ``chain[start:]`` in order; (result, index of the backend that gave it).

        ``bad_request_stops`` False (stream resumption): a backend that rejects the continuation
        request, which router-ml built, is skipped like a failed one.
        """
        for i in range(start, len(chain)):
            backend = self.catalog.get(chain[i])
            server = server_key(backend)
            if server in state.servers:  # another name for a server this request already tried
                state.errors.append(
                    f"backend {backend.name!r}: skipped, its server {server} was already tried"
                )
                continue
            state.servers.add(server)
            can_fall_back = any(
                not self.breaker.is_open(n) and server_key(self.catalog.get(n)) not in state.servers
                for n in chain[i + 1 :]
            )
            retries = (
                min(backend.max_retries, self.retries_before_fallback)
                if can_fall_back
                else backend.max_retries
            )
            try:
                return await op(backend, retries, can_fall_back), i
            except BackendError as err:
                if isinstance(err, BadRequest) and bad_request_stops:
                    raise
                state.errors.append(str(err))
                state.last_error = err if not isinstance(err, CircuitOpen) else state.last_error or err
                if i + 1 < len(chain):
                    log.warning("falling back from %r: %s", backend.name, err.message)
        raise AllBackendsFailed(list(chain[start:]), state.errors, state.last_error)

    # ------------------------------------------------------------------------------ public
    async def chat(
        self, name: str, payload: Mapping[str, Any], *, max_retries: int | None = None
    ) -> ChatResult:
        """A non-stream chat completion from backend ``name``, with retries."""
        backend = self.catalog.get(name)
        state = _CallState(t0=time.perf_counter())
        body = self._body(backend, payload, stream=False)
        retries = backend.max_retries if max_retries is None else max_retries
        return await self._attempts(
            backend, lambda: self._post(backend, body, state), retries, False, state, True
        )

    async def stream(
        self, name: str, payload: Mapping[str, Any], *, max_retries: int | None = None
    ) -> ChatStream:
        """A streamed chat completion from backend ``name``: returns once the first content arrived.

        Failures before that are retried; a break after it raises :class:`StreamInterrupted` from
        the iteration.
        """
        backend = self.catalog.get(name)
        state = _CallState(t0=time.perf_counter())
        body = self._body(backend, payload, stream=True)
        retries = backend.max_retries if max_retries is None else max_retries
        up = await self._attempts(backend, lambda: self._open(backend, body), retries, False, state, False)
        return ChatStream(self, payload, up, state, resume=None)

    async def chat_with_fallback(
        self, chain: Sequence[str], payload: Mapping[str, Any], stream: bool = False
    ) -> ChatResult | ChatStream:
        """Try each backend of ``chain`` in order (skipping open circuits) until one answers.

        ``stream=False``: a :class:`ChatResult` (``tried`` / ``errors`` say which backends failed and
        why). ``stream=True``: a :class:`ChatStream`, returned once the first content arrived; a
        break after that resumes the answer on the next backends. :class:`BadRequest` is raised at
        once; :class:`AllBackendsFailed` when no backend answered.
        """
        chain = list(chain)
        if not chain:
            raise ValueError("chat_with_fallback: the fallback chain is empty")
        for name in chain:
            self.catalog.get(name)  # UnknownModelError names the catalog
        state = _CallState(t0=time.perf_counter())

        if stream:

            async def open_one(backend: Backend, retries: int, can_fall_back: bool) -> Upstream:
                body = self._body(backend, payload, stream=True)
                return await self._attempts(
                    backend, lambda: self._open(backend, body), retries, can_fall_back, state, False
                )

            up, index = await self._walk(chain, 0, open_one, state)
            return ChatStream(self, payload, up, state, resume=self._resumer(chain, index, payload, state))

        async def post_one(backend: Backend, retries: int, can_fall_back: bool) -> ChatResult:
            body = self._body(backend, payload, stream=False)
            return await self._attempts(
                backend, lambda: self._post(backend, body, state), retries, can_fall_back, state, True
            )

        result, _ = await self._walk(chain, 0, post_one, state)
        return result

    def _resumer(self, chain: list[str], index: int, payload: Mapping[str, Any], state: _CallState) -> Resume:
        """The stream's resume callback: each call continues on the backends after the last one used."""

        async def resume(partial: str) -> Upstream:
            nonlocal index
            up, index = await self._resume(chain, index, payload, partial, state)
            return up

        return resume

    async def _resume(
        self, chain: list[str], index: int, payload: Mapping[str, Any], partial: str, state: _CallState
    ) -> tuple[Upstream, int]:
        """Open the continuation of ``partial`` on the backends after ``chain[index]``."""

        async def open_one(backend: Backend, retries: int, can_fall_back: bool) -> Upstream:
            cont = continuation_payload(
                payload, partial, _uses_prefill(backend), self.count_tokens(backend, partial)
            )
            body = self._body(backend, cont, stream=True)
            # the continuation prefills the prompt and the answer so far before its first token
            deadline = self.first_token_deadline(backend, self.count_prompt(backend, body))
            return await self._attempts(
                backend, lambda: self._open(backend, body, deadline), retries, can_fall_back, state, False
            )

        if index + 1 >= len(chain):
            last = state.last_error
            raise AllBackendsFailed(chain, [*state.errors, "no backend left to resume on"], last)
        return await self._walk(chain, index + 1, open_one, state, bad_request_stops=False)

    async def check_health(self, name: str) -> None:
        """GET ``<server root>/health`` of a catalog backend (vLLM answers 200 while its engine
        runs); raises (``httpx`` errors) when the server does not answer or answers 5xx. A server
        without the route (404: llama.cpp) counts as alive: it answered. Not ``/v1/models``, which
        llama-cpp-python serves under its model lock, cutting a running stream short."""
        backend = self.catalog.get(name)
        resp = await self.http.get(
            f"{backend.root_url}/health",
            headers=self._headers(backend),
            timeout=backend.connect_timeout_s + 1,
        )
        if resp.status_code >= 500:
            resp.raise_for_status()

    async def scrape_metrics(self, name: str) -> dict[str, float | None]:
        """:func:`scrape_vllm_metrics` of a catalog backend (its server root)."""
        backend = self.catalog.get(name)
        return await scrape_vllm_metrics(
            backend.root_url, http=self.http, timeout_s=backend.connect_timeout_s + 1
        )
