"""Streams from the backends: one upstream SSE response (:class:`Upstream`) and the answer the caller
iterates (:class:`ChatStream`), resumed on the next backend when a stream breaks mid-answer."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from router_ml.serving.catalog import Backend
from router_ml.serving.client_base import (
    BackendError,
    BackendTimeout,
    ChatResult,
    StreamInterrupted,
    _CallState,
    _within,
    transport_error,
)
from router_ml.serving.resume import (
    _content_text,
    _delta,
    _drop_prefix,
    _uses_prefill,
    overlap_to_strip,
    prompt_text,
)

if TYPE_CHECKING:
    from router_ml.serving.client import BackendClient

log = logging.getLogger("router_ml.serving.client")


class Upstream:
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
        upstream: Upstream,
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

    def _segment(self, up: Upstream) -> _Segment:
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
