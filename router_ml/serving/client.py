"""Async client for OpenAI-compatible backends: retries, circuit breaker, fallback chain, stream resume.

One shared ``httpx.AsyncClient`` (HTTP/1.1 keep-alive) talks to every backend of a
:class:`~router_ml.serving.catalog.Catalog`: vLLM, llama.cpp, OpenAI, Anthropic's OpenAI-compatible
endpoint. Per call it sends ``model = served_model_id`` and the bearer key read from ``api_key_env``
(never logged), and measures client-side TTFT (first content chunk), tokens/s, usage (the
upstream's, or counted with the backend's tokenizer when a stream has none) and cost.

Failure handling, in the spirit of LiteLLM's router (retries, cooldown, fallbacks):

- **Retries** of retryable failures (connect errors, timeouts, 408/409/429/500/502/503/504, broken
  or invalid streams before the first token) with exponential backoff and jitter; ``Retry-After``
  (seconds or an HTTP date) on 429/503 is honoured up to ``retry_after_cap_s``, and trips the
  backend's circuit for that long.
- **First-token deadline**: a stream must deliver content within ``first_token_timeout_s``; a
  non-stream answer within that plus ``max_tokens`` decoded at half the expected speed. A hang
  becomes a retryable :class:`BackendTimeout` after that, not after the whole-request ``timeout_s``.
- **Circuit breaker** (:class:`CircuitBreaker`): ``fail_threshold`` consecutive failures open a
  backend for ``cooldown_s``; then one trial request decides.
- **Fallback** (:meth:`BackendClient.chat_with_fallback`): backends in order, skipping open
  circuits. A backend with a fallback after it is retried only for HTTP status errors
  (``retries_before_fallback``), never for a timeout, a refused connection or a Retry-After
  (the next backend is faster). An upstream 4xx other than 408/409/429 is a :class:`BadRequest`:
  raised at once, never retried, never sent to another backend.
- **Stream resume**: when a stream breaks after content was sent, the next backend continues the
  partial answer: for vLLM it is prefilled as the final assistant message
  (``continue_final_message: true, add_generation_prompt: false``); other servers (llama.cpp, APIs)
  are asked to continue (:data:`CONTINUE_PROMPT`) and any text they repeat is cut
  (:func:`overlap_to_strip`). The caller sees one stream without duplicated text; only choice 0 of
  a stream is tracked.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from router_ml.decision.spec import UnknownModelError
from router_ml.serving.breaker import CircuitBreaker
from router_ml.serving.catalog import Backend, Catalog
from router_ml.serving.vllm_metrics import (  # re-exported: the client's public API
    scrape_vllm_metrics,
)

if TYPE_CHECKING:
    from router_ml.decision.costs import CostModel
    from router_ml.decision.latency import LatencyModel

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
CONTINUE_PROMPT = (
    "Continue your previous answer exactly where it stopped, without repeating any of it "
    "and without any preamble."
)
MIN_OVERLAP = 8  # shortest repeated text cut from a continuation (shorter matches may be genuine)
_HOLD_LIMIT = 2048  # characters of a continuation held back at most while looking for repeated text


# ------------------------------------------------------------------------------------------ errors
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
    ones before ``backend`` were left."""

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


@dataclass
class _CallState:
    t0: float
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    last_error: BackendError | None = None


# ------------------------------------------------------------------------------------------ helpers
async def _within(aw: Awaitable[T], seconds: float) -> T:
    """``await aw`` or raise ``asyncio.TimeoutError`` after ``seconds``."""
    if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per call
        async with asyncio.timeout(seconds):
            return await aw
    return await asyncio.wait_for(aw, seconds)


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


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def prompt_text(messages: Any) -> str:
    """The text of a conversation that counts as prompt tokens (contents, one message per line)."""
    if not isinstance(messages, list):
        return ""
    return "\n".join(_content_text(m.get("content")) for m in messages if isinstance(m, Mapping))


def overlap_to_strip(partial: str, new: str, final: bool = False) -> int | None:
    """How many leading characters of a continuation ``new`` repeat the end of ``partial``.

    ``None`` while it cannot tell yet (``new`` still reads like a repetition of part of ``partial``
    and ``final`` is False): hold the text and ask again when more arrives. A restart of the whole
    answer strips all of ``partial``; a repeated tail is stripped when at least :data:`MIN_OVERLAP`
    characters long (or all of ``partial``).
    """
    if not new or not partial:
        return 0 if final or not partial else None
    if not final and len(new) < _HOLD_LIMIT and new in partial and not new.endswith(partial):
        return None
    for k in range(min(len(partial), len(new)), 0, -1):
        if (k >= MIN_OVERLAP or k == len(partial)) and partial.endswith(new[:k]):
            return k
    return 0


def _drop_prefix(chunks: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``chunks`` with the first ``n`` characters of content removed (emptied content chunks dropped)."""
    out = []
    for chunk in chunks:
        delta = _delta(chunk)
        if n > 0 and delta is not None and delta.get("content"):
            k = min(n, len(delta["content"]))
            delta["content"], n = delta["content"][k:], n - k
            if not delta["content"] and len(delta) == 1 and not chunk["choices"][0].get("finish_reason"):
                continue
        out.append(chunk)
    return out


def _delta(chunk: Mapping[str, Any]) -> dict[str, Any] | None:
    choices = chunk.get("choices")
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        return delta if isinstance(delta, dict) else None
    return None


def continuation_payload(
    payload: Mapping[str, Any], partial: str, prefill: bool, tokens_done: int = 0
) -> dict:
    """The request that makes a backend continue ``partial`` (the answer sent so far).

    ``prefill`` (vLLM): ``partial`` becomes the final assistant message, continued by the chat
    template (``continue_final_message``). Otherwise a user turn asks to continue. ``max_tokens``
    shrinks by ``tokens_done``.
    """
    body = dict(payload)
    messages = [*payload.get("messages", []), {"role": "assistant", "content": partial}]
    if prefill:
        body["continue_final_message"], body["add_generation_prompt"] = True, False
    else:
        messages.append({"role": "user", "content": CONTINUE_PROMPT})
    body["messages"] = messages
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            body[key] = max(1, body[key] - tokens_done)
    return body


def _uses_prefill(backend: Backend) -> bool:
    """vLLM servers continue a final assistant message; llama.cpp and API backends are asked to."""
    return backend.kind == "vllm" and (backend.launch or {}).get("engine", "vllm") == "vllm"


# ----------------------------------------------------------------------------------------- streams
class _Upstream:
    """One open streaming response: chunks read up to the first content (``prime``), then the rest."""

    def __init__(self, backend: Backend, body: dict, resp: httpx.Response, t_start: float) -> None:
        self.backend, self.body, self.resp, self.t_start = backend, body, resp, t_start
        self.lines = resp.aiter_lines()
        self.buffer: list[dict[str, Any]] = []
        self.t_first: float | None = None  # perf_counter() of the first content chunk
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self.text: list[str] = []
        self.done = self.saw_done = False

    def _broken(self, why: str) -> BackendError:
        return BackendError(self.backend.name, why, retryable=True)

    async def _next(self) -> dict[str, Any] | None:
        """The next chunk; None at a clean end; BackendError when the stream breaks."""
        while not self.done:
            try:
                line = await self.lines.__anext__()
            except StopAsyncIteration:
                self.done = True
                if self.finish is None:
                    raise self._broken("stream ended before a finish_reason or [DONE]") from None
                return None
            except httpx.HTTPError as err:
                self.done = True
                if self.finish is not None:  # only the usage chunk or [DONE] was lost
                    return None
                raise _transport_error(self.backend, err) from None
            if time.perf_counter() - self.t_start > self.backend.timeout_s:
                self.done = True
                raise BackendTimeout(
                    self.backend.name,
                    f"stream outlasted timeout_s = {self.backend.timeout_s:g} s",
                    retryable=True,
                )
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                self.done = self.saw_done = True
                return None
            try:
                chunk = json.loads(data)
            except ValueError:
                raise self._broken("stream carried invalid JSON") from None
            if not isinstance(chunk, dict):
                raise self._broken("stream carried a non-object event")
            if chunk.get("error") and not chunk.get("choices"):
                err = chunk["error"]
                raise self._broken(
                    f"error event in stream: {err.get('message') if isinstance(err, dict) else err}"
                )
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if choices and isinstance(choices[0], dict) and choices[0].get("index", 0) == 0:
                delta = choices[0].get("delta") or {}
                content = delta.get("content")
                if content:
                    self.text.append(content)
                if self.t_first is None and (
                    content or delta.get("tool_calls") or delta.get("reasoning_content")
                ):
                    self.t_first = time.perf_counter()
                if choices[0].get("finish_reason"):
                    self.finish = choices[0]["finish_reason"]
            return chunk
        return None

    async def prime(self) -> None:
        """Read (and keep) chunks until the first content arrives or the stream ends."""
        while self.t_first is None:
            chunk = await self._next()
            if chunk is None:
                return
            self.buffer.append(chunk)

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        while self.buffer:
            yield self.buffer.pop(0)
        while (chunk := await self._next()) is not None:
            yield chunk

    async def aclose(self) -> None:
        if self.saw_done:  # read the end of the body after [DONE], so that the connection is reused
            with contextlib.suppress(Exception):
                await _within(self._drain(), 0.5)
        await self.resp.aclose()

    async def _drain(self) -> None:
        async for _ in self.lines:
            pass


@dataclass
class _Segment:
    backend: str
    prompt_tokens: int
    completion_tokens: int
    counted: bool
    cost: float | None


class ChatStream:
    """An answer as OpenAI ``chat.completion.chunk`` dicts: ``async for chunk in stream``.

    Returned by :meth:`BackendClient.stream` / :meth:`~BackendClient.chat_with_fallback` once the
    first content arrived (failures before that raised there). ``result`` (:class:`ChatResult`) is
    filled when the iteration ends; ``tried`` grows if the stream resumes on a fallback. Chunks keep
    the first backend's ``id``/``created``; ``model`` is the name of the backend that produced them.
    The usage chunk (combined over resumed backends) is yielded only when the payload asked for it
    (``stream_options.include_usage``). Close it (``aclose`` / ``async with``) when abandoning it.
    """

    def __init__(
        self,
        client: BackendClient,
        chain: list[str],
        index: int,
        payload: Mapping[str, Any],
        upstream: _Upstream,
        state: _CallState,
        resume: bool,
    ) -> None:
        self._client, self._chain, self._index, self._payload = client, chain, index, payload
        self._up, self._state, self._resume = upstream, state, resume
        opts = payload.get("stream_options")
        self._want_usage = isinstance(opts, Mapping) and bool(opts.get("include_usage"))
        self.result: ChatResult | None = None
        self.tried = state.tried
        self._gen = self._run()

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()
        await self._up.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _segment(self, up: _Upstream) -> _Segment:
        usage = up.usage or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        counted = not (isinstance(pt, int) and isinstance(ct, int))
        if counted:
            pt = self._client.count_tokens(up.backend, prompt_text(up.body.get("messages")))
            ct = self._client.count_tokens(up.backend, "".join(up.text))
        return _Segment(up.backend.name, pt, ct, counted, self._client.cost(up.backend.name, pt, ct))

    async def _run(self) -> AsyncIterator[dict[str, Any]]:
        client, state = self._client, self._state
        sent: list[str] = []
        segments: list[_Segment] = []
        ident: tuple[Any, Any] | None = None
        t_first: float | None = None
        resumed = False
        while True:
            up = self._up
            t_first = t_first or up.t_first
            held: list[dict[str, Any]] | None = [] if resumed and not _uses_prefill(up.backend) else None
            partial = "".join(sent)
            try:
                async for chunk in up.chunks():
                    if not chunk.get("choices"):
                        continue  # the usage chunk: re-emitted, combined, at the end
                    ident = ident or (chunk.get("id"), chunk.get("created"))
                    chunk["id"], chunk["created"], chunk["model"] = ident[0], ident[1], up.backend.name
                    delta = _delta(chunk)
                    if resumed and delta is not None and "role" in delta:
                        delta.pop("role")
                        if not delta.get("content") and not chunk["choices"][0].get("finish_reason"):
                            continue
                    if held is not None:
                        held.append(chunk)
                        cut = overlap_to_strip(
                            partial, "".join(_content_text((_delta(c) or {}).get("content")) for c in held)
                        )
                        if cut is None:
                            continue
                        ready, held = _drop_prefix(held, cut), None
                    else:
                        ready = [chunk]
                    for c in ready:
                        sent.append(_content_text((_delta(c) or {}).get("content")))
                        yield c
                if held:
                    joined = "".join(_content_text((_delta(c) or {}).get("content")) for c in held)
                    for c in _drop_prefix(held, overlap_to_strip(partial, joined, final=True) or 0):
                        sent.append(_content_text((_delta(c) or {}).get("content")))
                        yield c
                segments.append(self._segment(up))
                break
            except BackendError as err:
                await up.aclose()
                client.breaker.record(up.backend.name, False)
                segments.append(self._segment(up))
                state.errors.append(str(err))
                state.last_error = err
                if not self._resume:
                    raise StreamInterrupted(
                        up.backend.name, f"stream broke mid-answer: {err.message}", "".join(sent)
                    ) from err
                log.warning(
                    "stream from %r broke after %d chars (%s); resuming on the next backend",
                    up.backend.name,
                    sum(map(len, sent)),
                    err.message,
                )
                self._up, self._index = await client._resume(
                    self._chain, self._index, self._payload, "".join(sent), state
                )
                resumed = True
        await up.aclose()
        client.breaker.record(up.backend.name, True)
        end = time.perf_counter()
        last = segments[-1]
        prompt_tokens = segments[0].prompt_tokens
        completion_tokens = sum(s.completion_tokens for s in segments)
        costs = [s.cost for s in segments]
        ttft = None if t_first is None else t_first - state.t0
        decode = None if up.t_first is None else end - up.t_first
        if up.t_first is not None and client.latency_model is not None:
            tps = last.completion_tokens / decode if decode and last.completion_tokens > 1 else None
            client._observe(up.backend.name, up.t_first - up.t_start, tps)
        self.result = ChatResult(
            backend=up.backend.name,
            text="".join(sent),
            finish_reason=up.finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_s=ttft,
            latency_s=end - state.t0,
            tokens_per_s=completion_tokens / (end - t_first) if t_first and end > t_first else None,
            cost_usd=None if any(c is None for c in costs) else sum(costs),
            attempts=state.attempts,
            usage_source="counted" if any(s.counted for s in segments) else "upstream",
            tried=state.tried,
            errors=state.errors,
        )
        if self._want_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            ident = ident or (None, None)
            yield {
                "id": ident[0],
                "object": "chat.completion.chunk",
                "created": ident[1],
                "model": up.backend.name,
                "choices": [],
                "usage": usage,
            }


def _transport_error(backend: Backend, err: httpx.HTTPError) -> BackendError:
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


# ------------------------------------------------------------------------------------------ client
class BackendClient:
    """Calls the backends of ``catalog`` through one shared ``httpx.AsyncClient``.

    ``breaker``: a :class:`CircuitBreaker` (default: 3 failures, 5 s cooldown); ``latency_model``:
    fed each successful call's TTFT and decode speed (streams: measured; non-stream: decode speed
    over the model's TTFT estimate); ``cost_model``: prices the calls (default: the catalog's pool).
    Create it anywhere; the HTTP client is made on first use, inside the running loop. Close it with
    :meth:`aclose` or ``async with``.
    """

    def __init__(
        self,
        catalog: Catalog,
        breaker: CircuitBreaker | None = None,
        latency_model: LatencyModel | None = None,
        cost_model: CostModel | None = None,
        *,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 2.0,
        retry_after_cap_s: float = 5.0,
        retries_before_fallback: int = 1,
        max_connections: int = 256,
        trust_env: bool = True,
        http: httpx.AsyncClient | None = None,
        seed: int | None = None,
    ) -> None:
        self.catalog = catalog
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.latency_model = latency_model
        self._cost_model = cost_model
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.retry_after_cap_s = retry_after_cap_s
        self.retries_before_fallback = retries_before_fallback
        self.max_connections, self.trust_env = max_connections, trust_env
        self._http, self._own_http = http, http is None
        self._rng = random.Random(seed)

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            limits = httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_connections,
                keepalive_expiry=30.0,
            )
            self._http = httpx.AsyncClient(
                limits=limits, timeout=httpx.Timeout(120.0), trust_env=self.trust_env
            )
        return self._http

    @property
    def cost_model(self) -> CostModel:
        if self._cost_model is None:
            from router_ml.decision.costs import CostModel

            self._cost_model = CostModel(self.catalog.pool())
        return self._cost_model

    async def aclose(self) -> None:
        if self._http is not None and self._own_http:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> BackendClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------------------- accounting
    def count_tokens(self, backend: Backend, text: str) -> int:
        """Tokens of ``text`` with the backend's tokenizer (``ModelSpec.tokenizer``)."""
        from router_ml.decision.costs import build_token_counter

        if not text:
            return 0
        return int(build_token_counter(backend.spec.tokenizer, backend.spec.kind).count([text])[0])

    def cost(self, name: str, prompt_tokens: float, completion_tokens: float) -> float | None:
        try:
            return self.cost_model.cost(name, prompt_tokens, completion_tokens)
        except UnknownModelError:
            return None

    def _observe(self, name: str, ttft_s: float | None, tokens_per_s: float | None) -> None:
        if self.latency_model is not None:
            with contextlib.suppress(UnknownModelError):
                self.latency_model.observe(name, ttft_s, tokens_per_s)

    def _expected_tps(self, backend: Backend) -> float | None:
        if self.latency_model is not None and backend.name in self.latency_model.pool:
            return float(self.latency_model.tokens_per_s[self.latency_model.pool.index(backend.name)])
        return backend.spec.tokens_per_s

    # -------------------------------------------------------------------------------- HTTP
    def _headers(self, backend: Backend) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = backend.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    @staticmethod
    def _body(backend: Backend, payload: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        body = dict(payload)
        body["model"], body["stream"] = backend.served_model_id, stream
        if stream:
            body["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream_options", None)
        return body

    def _status_error(self, backend: Backend, resp: httpx.Response) -> BackendError:
        status, text = resp.status_code, resp.text
        try:
            err = json.loads(text).get("error")
            text = str(err.get("message") if isinstance(err, dict) else err or text)
        except (ValueError, AttributeError):
            pass
        text = text.strip()[:300]
        key = backend.api_key()
        if key and key in text:  # never let an upstream echo the key into our errors or logs
            text = text.replace(key, "***")
        message = f"HTTP {status}: {text}"
        if 400 <= status < 500 and status not in (408, 409, 429):
            return BadRequest(backend.name, message, status=status)
        retry_after = parse_retry_after(resp.headers.get("retry-after")) if status in (429, 503) else None
        return BackendError(
            backend.name,
            message,
            status=status,
            retryable=status in RETRYABLE_STATUS,
            retry_after=retry_after,
        )

    def _response_deadline(self, backend: Backend, body: Mapping[str, Any]) -> float:
        """Non-stream: the first-token deadline plus ``max_tokens`` at half the expected decode speed."""
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or backend.spec.max_tokens
        tps = self._expected_tps(backend)
        if not isinstance(max_tokens, int) or not tps:
            return backend.timeout_s
        return min(backend.timeout_s, backend.first_token_timeout_s + max_tokens / (0.5 * tps))

    async def _post(self, backend: Backend, body: dict[str, Any], state: _CallState) -> ChatResult:
        """One non-stream attempt."""
        deadline = self._response_deadline(backend, body)
        timeout = httpx.Timeout(backend.timeout_s, connect=backend.connect_timeout_s, read=deadline)
        t = time.perf_counter()
        try:
            resp = await _within(
                self.http.post(backend.chat_url, json=body, headers=self._headers(backend), timeout=timeout),
                backend.timeout_s,
            )
        except asyncio.TimeoutError:
            raise BackendTimeout(
                backend.name, f"no answer within {backend.timeout_s:g} s", retryable=True
            ) from None
        except httpx.ReadTimeout:
            raise BackendTimeout(backend.name, f"no answer within {deadline:.2f} s", retryable=True) from None
        except httpx.HTTPError as err:
            raise _transport_error(backend, err) from None
        end = time.perf_counter()
        if resp.status_code != 200:
            raise self._status_error(backend, resp)
        try:
            data = resp.json()
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BackendError(
                backend.name, "answer is not a chat.completion JSON", status=200, retryable=True
            ) from None
        text = _content_text(message.get("content"))
        usage = data.get("usage") or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        counted = not (isinstance(pt, int) and isinstance(ct, int))
        if counted:
            pt = self.count_tokens(backend, prompt_text(body.get("messages")))
            ct = self.count_tokens(backend, text)
        if self.latency_model is not None and ct >= 8 and backend.name in self.latency_model.pool:
            ttft_est = float(self.latency_model.ttft[self.latency_model.pool.index(backend.name)])
            if end - t > 1.25 * ttft_est:
                self._observe(backend.name, None, ct / (end - t - ttft_est))
        return ChatResult(
            backend=backend.name,
            text=text,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=pt,
            completion_tokens=ct,
            ttft_s=None,
            latency_s=end - state.t0,
            tokens_per_s=ct / (end - t) if end > t else None,
            cost_usd=self.cost(backend.name, pt, ct),
            attempts=state.attempts,
            raw=data,
            usage_source="counted" if counted else "upstream",
            tried=state.tried,
            errors=state.errors,
        )

    async def _open(self, backend: Backend, body: dict[str, Any]) -> _Upstream:
        """One stream attempt, returned once the first content arrived (or the stream ended)."""
        timeout = httpx.Timeout(
            backend.timeout_s, connect=backend.connect_timeout_s, read=backend.first_token_timeout_s
        )
        request = self.http.build_request(
            "POST", backend.chat_url, json=body, headers=self._headers(backend), timeout=timeout
        )

        async def first_token() -> _Upstream:
            resp = await self.http.send(request, stream=True)
            try:
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._status_error(backend, resp)
                up = _Upstream(backend, body, resp, t)
                await up.prime()
                return up
            except BaseException:
                await resp.aclose()
                raise

        t = time.perf_counter()
        try:
            return await _within(first_token(), backend.first_token_timeout_s)
        except asyncio.TimeoutError:
            msg = f"no first token within {backend.first_token_timeout_s:g} s"
            raise BackendTimeout(backend.name, msg, retryable=True) from None
        except httpx.HTTPError as err:
            raise _transport_error(backend, err) from None

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
                self.breaker.record(name, False)
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
            can_fall_back = any(not self.breaker.is_open(n) for n in chain[i + 1 :])
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
        return ChatStream(self, [name], 0, payload, up, state, resume=False)

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

            async def open_one(backend: Backend, retries: int, can_fall_back: bool) -> _Upstream:
                body = self._body(backend, payload, stream=True)
                return await self._attempts(
                    backend, lambda: self._open(backend, body), retries, can_fall_back, state, False
                )

            up, index = await self._walk(chain, 0, open_one, state)
            return ChatStream(self, chain, index, payload, up, state, resume=True)

        async def post_one(backend: Backend, retries: int, can_fall_back: bool) -> ChatResult:
            body = self._body(backend, payload, stream=False)
            return await self._attempts(
                backend, lambda: self._post(backend, body, state), retries, can_fall_back, state, True
            )

        result, _ = await self._walk(chain, 0, post_one, state)
        return result

    async def _resume(
        self, chain: list[str], index: int, payload: Mapping[str, Any], partial: str, state: _CallState
    ) -> tuple[_Upstream, int]:
        """Open the continuation of ``partial`` on the backends after ``chain[index]``."""

        async def open_one(backend: Backend, retries: int, can_fall_back: bool) -> _Upstream:
            cont = continuation_payload(
                payload, partial, _uses_prefill(backend), self.count_tokens(backend, partial)
            )
            body = self._body(backend, cont, stream=True)
            return await self._attempts(
                backend, lambda: self._open(backend, body), retries, can_fall_back, state, False
            )

        if index + 1 >= len(chain):
            last = state.last_error
            raise AllBackendsFailed(chain, [*state.errors, "no backend left to resume on"], last)
        return await self._walk(chain, index + 1, open_one, state, bad_request_stops=False)

    async def scrape_metrics(self, name: str) -> dict[str, float | None]:
        """:func:`scrape_vllm_metrics` of a catalog backend (its server root)."""
        backend = self.catalog.get(name)
        return await scrape_vllm_metrics(
            backend.root_url, http=self.http, timeout_s=backend.connect_timeout_s + 1
        )
