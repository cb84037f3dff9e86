"""Route in-process, without the proxy: a drop-in for the OpenAI client's chat API.

    from router_ml.serving.sdk import RouterClient
    client = RouterClient.from_files(ckpt="checkpoints/my-router", backends="conf/backends/local.yaml")
    reply = client.chat.completions.create(model="router", messages=[{"role": "user", "content": "..."}])
    reply.model, reply.choices[0].message.content, client.last_decision.reason
    for chunk in client.chat.completions.create(model="router:utility:500", messages=..., stream=True): ...

Same engine as the proxy (:class:`~router_ml.serving.engine.RoutingEngine`): the same decisions,
fallbacks, ledger and routing log. Replies are the ``openai`` package's ``ChatCompletion`` /
``ChatCompletionChunk`` objects when it is installed, plain dicts otherwise. Errors raise
:class:`~router_ml.serving.openai_errors.ApiError` (``status``, ``message``) as the proxy would answer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from router_ml.decision.base import RoutingDecision
from router_ml.serving.engine import RoutingEngine


def _typed(obj: dict[str, Any], kind: str) -> Any:
    try:
        from openai.types.chat import ChatCompletion, ChatCompletionChunk
    except ImportError:  # pragma: no cover - openai is optional
        return obj
    return (ChatCompletion if kind == "completion" else ChatCompletionChunk).model_validate(obj)


class _Loop:
    """One event loop in a daemon thread: the engine's async client lives there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="router-ml-sdk", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class _Completions:
    def __init__(self, client: RouterClient) -> None:
        self._client = client

    def create(
        self, *, model: str = "router", messages: list[dict[str, Any]], stream: bool = False, **kw: Any
    ) -> Any:
        body = {"model": model, "messages": messages, "stream": stream, **kw}
        return self._client._complete(body)


class _Chat:
    def __init__(self, client: RouterClient) -> None:
        self.completions = _Completions(client)


class RouterClient:
    """``client.chat.completions.create(model="router", ...)`` routed in-process."""

    def __init__(self, engine: RoutingEngine) -> None:
        self.engine = engine
        self._loop = _Loop()
        self.chat = _Chat(self)
        self.last_decision: RoutingDecision | None = None

    @classmethod
    def from_files(cls, ckpt: str, backends: str, policy: str = "utility", **kw: Any) -> RouterClient:
        from router_ml.serving.proxy import build_engine

        return cls(build_engine(ckpt, backends, policy=policy, **kw))

    def _complete(self, body: dict[str, Any]) -> Any:
        outcome = self._loop.run(self.engine.complete(body))
        self.last_decision = outcome.decision
        if outcome.stream is None:
            raw = dict(outcome.result.raw or {})
            raw["model"] = outcome.result.backend
            return _typed(raw, "completion")
        return self._chunks(outcome, body)

    def _chunks(self, outcome: Any, body: dict[str, Any]) -> Iterator[Any]:
        agen = self.engine.iterate(outcome, outcome.routed_prompt)
        try:
            while True:
                try:
                    chunk = self._loop.run(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield _typed(chunk, "chunk")
        finally:
            self._loop.run(agen.aclose())

    def close(self) -> None:
        self._loop.run(self.engine.aclose())
        self._loop.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
