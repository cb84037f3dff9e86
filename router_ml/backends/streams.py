"""Streams from the backends and their resumption.

One upstream SSE response is an :class:`Upstream`; the answer the caller iterates is a
:class:`ChatStream`. When a stream breaks after content was sent, the stream asks its ``resume``
callback (given by :class:`~router_ml.backends.client.BackendClient`, which walks the rest of the
fallback chain) for the continuation: :func:`continuation_payload` builds the request (vLLM
continues a prefilled assistant message, other servers are asked to continue) and
:func:`overlap_to_strip` cuts any text the new backend repeats.

A stream that has sent a tool-call delta is never resumed: a break after it raises
:class:`~router_ml.backends.results.StreamInterrupted`. The continuation requests continue *text*
(a prefilled assistant message, or a request to go on); a half-sent tool call (its ``id``, name and
the first characters of its JSON arguments already with the client) has no such continuation, and
another backend asked again would start a new call with a new id, or prose, which the client's
accumulated ``tool_calls`` cannot absorb. Failing the stream tells the client to retry the turn
cleanly; before the first delta, failures still fall back to the next backend.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import orjson

from router_ml.backends.anthropic import StreamError, StreamTranslator
from router_ml.backends.catalog import Backend
from router_ml.backends.results import (
    BackendError,
    BackendTimeout,
    ChatResult,
    StreamInterrupted,
    _CallState,
    _within,
    cache_tokens,
    transport_error,
)

if TYPE_CHECKING:
    from router_ml.backends.breaker import CircuitBreaker

log = logging.getLogger("router_ml.backends.client")

CONTINUE_PROMPT = (
    "Continue your previous answer exactly where it stopped, without repeating any of it "
    "and without any preamble."
)
MIN_OVERLAP = 8  # shortest repeated text cut from a continuation (shorter matches may be genuine)
_HOLD_LIMIT = 2048  # characters of a continuation held back at most while looking for repeated text


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def tool_call_text(calls: Any) -> str:
    """The generated text of ``tool_calls`` (whole or stream deltas): names and arguments, which
    count as completion tokens when a backend reports no usage."""
    if not isinstance(calls, list):
        return ""
    fns = [c.get("function") for c in calls if isinstance(c, Mapping)]
    return "".join(f"{f.get('name') or ''}{f.get('arguments') or ''}" for f in fns if isinstance(f, Mapping))


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
    """vLLM servers and Anthropic's Messages API continue a final assistant message; llama.cpp and
    OpenAI-style API backends are asked to."""
    if backend.api == "anthropic":
        return True
    return backend.kind == "vllm" and (backend.launch or {}).get("engine", "vllm") == "vllm"


class Upstream:
    """One open streaming response: chunks read up to the first content (``prime``), then the rest.

    An Anthropic stream's events are translated into chunks on the way in
    (:class:`~router_ml.backends.anthropic.StreamTranslator`); ``message_stop`` plays ``[DONE]``.
    """

    def __init__(self, backend: Backend, body: dict, resp: httpx.Response, t_start: float) -> None:
        self.backend, self.body, self.resp, self.t_start = backend, body, resp, t_start
        self.lines = resp.aiter_lines()
        self.buffer: list[dict[str, Any]] = []
        self.t_first: float | None = None  # perf_counter() of the first content chunk
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self.text: list[str] = []
        self.done = self.saw_done = False
        self.translator = StreamTranslator() if backend.api == "anthropic" else None
        self.pending: list[dict[str, Any]] = []  # chunks translated from one event, not yet taken

    def _broken(self, why: str) -> BackendError:
        return BackendError(self.backend.name, why, retryable=True)

    async def _next(self) -> dict[str, Any] | None:
        """The next chunk; None at a clean end; BackendError when the stream breaks."""
        while self.pending or not self.done:
            if self.pending:
                return self._take(self.pending.pop(0))
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
                raise transport_error(self.backend, err) from None
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
                chunk = orjson.loads(data)
            except ValueError:
                raise self._broken("stream carried invalid JSON") from None
            if not isinstance(chunk, dict):
                raise self._broken("stream carried a non-object event")
            if self.translator is not None:
                try:
                    self.pending.extend(self.translator.feed(chunk))
                except StreamError as err:
                    self.done = True
                    raise self._broken(f"error event in stream: {err}") from None
                if self.translator.done:
                    self.done = self.saw_done = True
                continue
            if chunk.get("error") and not chunk.get("choices"):
                err = chunk["error"]
                raise self._broken(
                    f"error event in stream: {err.get('message') if isinstance(err, dict) else err}"
                )
            return self._take(chunk)
        return None

    def _take(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """Account for one chunk (usage, text, first-token time, finish) and return it."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if choices and isinstance(choices[0], dict) and choices[0].get("index", 0) == 0:
            delta = choices[0].get("delta") or {}
            content = delta.get("content")
            if content:
                self.text.append(content)
            if delta.get("tool_calls"):  # counted as output, never sent on as text
                self.text.append(tool_call_text(delta["tool_calls"]))
            if self.t_first is None and (
                content or delta.get("tool_calls") or delta.get("reasoning_content")
            ):
                self.t_first = time.perf_counter()
            if choices[0].get("finish_reason"):
                self.finish = choices[0]["finish_reason"]
        return chunk

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


class StreamHost(Protocol):
    """What a :class:`ChatStream` asks of the client that opened it (a
    :class:`~router_ml.backends.client.BackendClient` is one): token counts and prices for its
    usage, the circuit breaker to report to, the latency model to feed."""

    breaker: CircuitBreaker

    def count_tokens(self, backend: Backend, text: str) -> int: ...

    def count_prompt(self, backend: Backend, body: Mapping[str, Any]) -> int: ...

    def cost(
        self,
        name: str,
        prompt_tokens: float,
        completion_tokens: float,
        cached_tokens: float = 0,
        cache_write_tokens: float = 0,
    ) -> float | None: ...

    def observe(self, name: str, ttft_s: float | None, tokens_per_s: float | None) -> None: ...


Resume = Callable[[str], Awaitable[Upstream]]
"""Opens the continuation of the text sent so far (the argument) on the next backend of the chain;
raises :class:`~router_ml.backends.results.AllBackendsFailed` when none is left."""


@dataclass
class _Segment:
    backend: str
    prompt_tokens: int
    completion_tokens: int
    counted: bool
    cost: float | None
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class ChatStream:
    """An answer as OpenAI ``chat.completion.chunk`` dicts: ``async for chunk in stream``.

    Returned by ``BackendClient.stream`` / ``BackendClient.chat_with_fallback`` once the first
    content arrived (failures before that raised there). A break mid-answer calls ``resume`` (None:
    raise :class:`StreamInterrupted` instead). ``result`` (:class:`ChatResult`) is
    filled when the iteration ends; ``tried`` grows if the stream resumes on a fallback. Chunks keep
    the first backend's ``id``/``created``; ``model`` is the name of the backend that produced them.
    The usage chunk (combined over resumed backends) is yielded only when the payload asked for it
    (``stream_options.include_usage``). Close it (``aclose`` / ``async with``) when abandoning it.
    """

    def __init__(
        self,
        host: StreamHost,
        payload: Mapping[str, Any],
        upstream: Upstream,
        state: _CallState,
        resume: Resume | None,
    ) -> None:
        self._host = host
        self._up, self._state, self._resume = upstream, state, resume
        opts = payload.get("stream_options")
        self._want_usage = isinstance(opts, Mapping) and bool(opts.get("include_usage"))
        self.result: ChatResult | None = None
        self.tried = state.tried
        # what was sent and what each upstream produced, kept so that a stream that fails or is
        # abandoned part-way is still booked with the tokens generated (:meth:`_settle`)
        self._sent: list[str] = []
        self._segments: list[_Segment] = []
        self._counted: Upstream | None = None  # the last upstream whose segment is in _segments
        self._t_first: float | None = None
        self._gen = self._run()

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()
        await self._up.aclose()
        if self.result is None:  # abandoned before its end (the client went away): book what came
            self._settle(self._up, complete=False)

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _count(self, up: Upstream) -> None:
        """Add ``up``'s segment (its usage, else its text counted) once."""
        if self._counted is not up:
            self._segments.append(self._segment(up))
            self._counted = up

    def _segment(self, up: Upstream) -> _Segment:
        usage = up.usage or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        counted = not (isinstance(pt, int) and isinstance(ct, int))
        cached, written = (0, 0) if counted else cache_tokens(usage)
        if counted:
            pt = self._host.count_prompt(up.backend, up.body)
            ct = self._host.count_tokens(up.backend, "".join(up.text))
        cost = self._host.cost(up.backend.name, pt, ct, cached, written)
        return _Segment(up.backend.name, pt, ct, counted, cost, cached, written)

    def _settle(self, up: Upstream, complete: bool) -> None:
        """Fill :attr:`result` from the segments so far (``up``'s included): the whole answer
        (``complete``) or the part generated before the stream failed or was abandoned, whose
        ``finish_reason`` is None and whose tokens and cost are what the backends produced."""
        if self.result is not None:
            return
        state = self._state
        self._count(up)
        segments, end = self._segments, time.perf_counter()
        last, t_first = segments[-1], self._t_first
        completion_tokens = sum(s.completion_tokens for s in segments)
        costs = [s.cost for s in segments]
        if complete and up.t_first is not None:
            decode = end - up.t_first
            tps = last.completion_tokens / decode if decode and last.completion_tokens > 1 else None
            self._host.observe(up.backend.name, up.t_first - up.t_start, tps)
        self.result = ChatResult(
            backend=up.backend.name,
            text="".join(self._sent),
            finish_reason=up.finish if complete else None,
            prompt_tokens=segments[0].prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_s=None if t_first is None else t_first - state.t0,
            latency_s=end - state.t0,
            tokens_per_s=completion_tokens / (end - t_first) if t_first and end > t_first else None,
            cost_usd=None if any(c is None for c in costs) else sum(costs),
            attempts=state.attempts,
            usage_source="counted" if any(s.counted for s in segments) else "upstream",
            tried=state.tried,
            errors=state.errors,
            cached_tokens=segments[0].cached_tokens,
            cache_write_tokens=segments[0].cache_write_tokens,
        )

    async def _run(self) -> AsyncIterator[dict[str, Any]]:
        host, state = self._host, self._state
        sent = self._sent
        ident: tuple[Any, Any] | None = None
        t_first: float | None = None
        resumed = False
        tool_call = False  # a tool-call delta was sent: the stream is never resumed after that
        while True:
            up = self._up
            t_first = self._t_first = t_first or up.t_first
            held: list[dict[str, Any]] | None = [] if resumed and not _uses_prefill(up.backend) else None
            partial = "".join(sent)
            # the Messages API got the prefill without its trailing whitespace, which the client has
            trim = resumed and up.backend.api == "anthropic" and partial[-1:].isspace()
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
                    if (
                        trim
                        and delta is not None
                        and isinstance(delta.get("content"), str)
                        and delta["content"]
                    ):
                        delta["content"], trim = delta["content"].lstrip(), False
                        if not delta["content"] and not chunk["choices"][0].get("finish_reason"):
                            trim = True  # all whitespace: keep trimming the next one
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
                        d = _delta(c) or {}
                        sent.append(_content_text(d.get("content")))
                        tool_call = tool_call or bool(d.get("tool_calls") or d.get("function_call"))
                        yield c
                if held:
                    joined = "".join(_content_text((_delta(c) or {}).get("content")) for c in held)
                    for c in _drop_prefix(held, overlap_to_strip(partial, joined, final=True) or 0):
                        d = _delta(c) or {}
                        sent.append(_content_text(d.get("content")))
                        tool_call = tool_call or bool(d.get("tool_calls") or d.get("function_call"))
                        yield c
                self._count(up)
                break
            except BackendError as err:
                await up.aclose()
                host.breaker.record(up.backend.name, False)
                self._count(up)
                state.errors.append(str(err))
                state.last_error = err
                if tool_call:
                    self._settle(up, complete=False)
                    raise StreamInterrupted(
                        up.backend.name,
                        f"stream broke inside a tool call, which is not resumed: {err.message}",
                        "".join(sent),
                    ) from err
                if self._resume is None:
                    self._settle(up, complete=False)
                    raise StreamInterrupted(
                        up.backend.name, f"stream broke mid-answer: {err.message}", "".join(sent)
                    ) from err
                log.warning(
                    "stream from %r broke after %d chars (%s); resuming on the next backend",
                    up.backend.name,
                    sum(map(len, sent)),
                    err.message,
                )
                try:
                    self._up = await self._resume("".join(sent))
                except BaseException:  # no backend left: book the part that was generated
                    self._settle(up, complete=False)
                    raise
                resumed = True
        await up.aclose()
        host.breaker.record(up.backend.name, True)
        self._settle(up, complete=True)
        prompt_tokens, completion_tokens = self.result.prompt_tokens, self.result.completion_tokens
        segments = self._segments
        if self._want_usage:
            usage: dict[str, Any] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            if segments[0].cached_tokens or segments[0].cache_write_tokens:
                usage["prompt_tokens_details"] = {"cached_tokens": segments[0].cached_tokens}
                usage["cache_creation_input_tokens"] = segments[0].cache_write_tokens
            ident = ident or (None, None)
            yield {
                "id": ident[0],
                "object": "chat.completion.chunk",
                "created": ident[1],
                "model": up.backend.name,
                "choices": [],
                "usage": usage,
            }
