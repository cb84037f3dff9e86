"""Routing decisions for the engine: micro-batched on a worker thread, or inline when the proxy is idle.

Requests that arrive while the encoder is busy form the next batch (no waiting window, so an idle
proxy adds no delay). When nothing else is in flight (no decision running or queued, no request
waiting on a backend) a decision runs inline on the event loop: the thread hop costs more than it
saves, since there is nothing to keep serving. Each decision comes with the time the encoder took
for its batch (``encode_s``), which the proxy reports in ``x-router-encode-ms``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from router_ml.decision.base import RoutingDecision
from router_ml.decision.layer import DecisionLayer

Decided = tuple[RoutingDecision | BaseException, float]  # (decision or its error, encoder seconds)


class TimedEncoder:
    """Wraps a router's encoder; ``last_s``: seconds the latest ``encode`` call took."""

    def __init__(self, encoder: Any) -> None:
        self.inner, self.last_s = encoder, 0.0

    def encode(self, *args: Any, **kw: Any) -> Any:
        return self._timed(self.inner.encode, args, kw)

    def encode_layers(self, *args: Any, **kw: Any) -> Any:
        return self._timed(self.inner.encode_layers, args, kw)

    def _timed(self, fn: Callable[..., Any], args: tuple, kw: dict[str, Any]) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.last_s = time.perf_counter() - t

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Decider:
    """Decisions of ``router`` (a LearnedRouter) among ``served`` models.

    ``busy()``: whether other requests are in flight (then decisions go to the worker thread);
    ``max_batch``: the most prompts embedded in one encoder call.
    """

    def __init__(
        self, router: Any, served: Sequence[str], busy: Callable[[], bool], max_batch: int = 32
    ) -> None:
        if not isinstance(router.encoder, TimedEncoder):
            router.encoder = TimedEncoder(router.encoder)
        self.router, self.served, self.busy, self.max_batch = router, list(served), busy, max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-ml-decide")
        self._pending: list[tuple[str, DecisionLayer, dict[str, Any], asyncio.Future, Any]] = []
        self._drainer: asyncio.Task | None = None

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    def decide_many(
        self,
        prompts: list[str],
        layer: DecisionLayer,
        constraints: dict[str, Any],
        allowed: Sequence[str] | None = None,
    ) -> list[Decided]:
        """Decisions for prompts that share a policy, constraints and candidate models (``allowed``,
        default all served ones; the rest are infeasible): one encoder batch for a stateless policy;
        one by one for a budgeted one (a refusal stays that request's own)."""
        enc = self.router.encoder
        allowed = self.served if allowed is None else list(allowed)
        if not layer.policy.stateful:
            try:
                got = self.router.route_batch(prompts, allowed_models=allowed, policy=layer, **constraints)
            except Exception as e:
                return [(e, enc.last_s)] * len(prompts)
            return [(d, enc.last_s) for d in got]
        out: list[Decided] = []
        for p in prompts:
            try:
                out.append(
                    (
                        self.router.route(p, allowed_models=allowed, policy=layer, **constraints),
                        enc.last_s,
                    )
                )
            except Exception as e:
                out.append((e, enc.last_s))
        return out

    async def _drain(self) -> None:
        """Decide everything pending, in batches of up to ``max_batch`` grouped by policy and constraints."""
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            groups: dict[tuple, list[tuple[str, DecisionLayer, dict[str, Any], asyncio.Future, Any]]] = {}
            for item in batch:
                key = (id(item[1]), tuple(sorted((k, repr(v)) for k, v in item[2].items())), item[4])
                groups.setdefault(key, []).append(item)
            for items in groups.values():
                prompts = [i[0] for i in items]
                results = await loop.run_in_executor(
                    self._executor, self.decide_many, prompts, items[0][1], items[0][2], items[0][4]
                )
                for (_, _, _, fut, _), res in zip(items, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)

    async def decide(
        self,
        prompt: str,
        layer: DecisionLayer,
        constraints: dict[str, Any],
        allowed: Sequence[str] | None = None,
    ) -> Decided:
        """``(decision or the exception deciding raised, encoder seconds)`` for one prompt, among
        ``allowed`` models (default: every served one)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        allowed = None if allowed is None else tuple(allowed)
        self._pending.append((prompt, layer, constraints, fut, allowed))
        if self._idle() and len(self._pending) == 1:
            await asyncio.sleep(0)  # requests that arrived together join this one's batch instead
            if self._idle() and len(self._pending) == 1 and self._pending[0][3] is fut:
                self._pending.clear()
                return self.decide_many([prompt], layer, constraints, allowed)[0]
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await fut

    def _idle(self) -> bool:
        return (self._drainer is None or self._drainer.done()) and not self.busy()
