"""Run a prompt set through a pool of backends into an :class:`~router_ml.collect.store.AnswerStore`.

Every (prompt, model) pair without a stored answer is sent once, through the proxy's own
:class:`~router_ml.backends.client.BackendClient` (retries, circuit breaker, timeouts): per
backend, ``concurrency`` workers share its queue, paced by its rate limit; each call reserves its
cost bound on the run's :class:`~router_ml.collect.pacing.SpendCap` first and settles with the bill
after, so the run never crosses the cap. Each finished call (answer or error) is committed before
the next is counted, so a ``kill -9`` loses nothing finished and a rerun asks only what is missing.

    from router_ml.collect.runner import collect
    summary = collect(read_prompts("prompts.jsonl"), Catalog.load("conf/backends/local.yaml"),
                      "outputs/collect/answers.sqlite", spend_cap_usd=1.0)

:func:`collect_from_config` does the same from the Hydra config (``conf/collect.yaml``) for
``python -m experiments.collect`` and ``router-ml collect``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from router_ml.backends.breaker import CircuitBreaker
from router_ml.backends.catalog import Backend, Catalog
from router_ml.backends.client import BackendClient
from router_ml.backends.results import (
    BackendError,
    BackendTimeout,
    ChatResult,
    CircuitOpen,
    StreamInterrupted,
)
from router_ml.collect.pacing import BackendLimit, SpendCap, backend_limits, cost_bound
from router_ml.collect.prompts import Prompt, prompts_from_data, read_prompts
from router_ml.collect.store import AnswerStore, CallRecord

log = logging.getLogger(__name__)

#: errors after which the upstream may have billed tokens we never saw: settled at their bound
MAYBE_BILLED = (BackendTimeout, StreamInterrupted)


@dataclass(frozen=True)
class RequestSettings:
    """What each call asks for. ``max_tokens`` is tightened to a backend's own ``max_tokens`` (never
    lifted); ``stream`` True measures time to first token; ``template_tokens``: the chat template's
    allowance in each call's cost bound; ``extra``: more OpenAI request fields (``top_p``, ``seed``...)."""

    max_tokens: int = 256
    temperature: float | None = 0.0
    system_prompt: str | None = None
    stream: bool = True
    template_tokens: int = 64
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"request.max_tokens = {self.max_tokens!r} must be an integer >= 1")
        if not isinstance(self.template_tokens, int) or self.template_tokens < 0:
            raise ValueError(f"request.template_tokens = {self.template_tokens!r} must be an integer >= 0")
        reserved = {"model", "messages", "stream", "max_tokens", "max_completion_tokens"} & set(self.extra)
        if reserved:
            raise ValueError(f"request.extra: field(s) {sorted(reserved)} are set by the collector")

    def max_tokens_for(self, backend: Backend) -> int:
        cap = backend.spec.max_tokens
        return self.max_tokens if cap is None else min(self.max_tokens, cap)

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt.prompt}]

    def payload(self, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {**self.extra, "messages": self.messages(prompt), "max_tokens": max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body


@dataclass
class _Tally:
    calls: int = 0
    answers: int = 0
    errors: int = 0
    duplicates: int = 0
    spent: float = 0.0
    left: int = 0
    gave_up: str | None = None
    failures_in_row: int = 0


async def _ask(client: BackendClient, name: str, payload: Mapping[str, Any], stream: bool) -> ChatResult:
    if not stream:
        return await client.chat(name, payload)
    answer = await client.stream(name, payload)
    async with answer:
        async for _ in answer:
            pass
    assert answer.result is not None  # set when the iteration ends
    return answer.result


def _answer_record(prompt: Prompt, backend: Backend, res: ChatResult, started: float) -> CallRecord:
    cost = res.cost_usd
    if cost is None:  # the client prices every catalog backend; this is a guard, not a path
        pin, pout = backend.spec.prices()
        cost = (res.prompt_tokens * pin + res.completion_tokens * pout) / 1e6
    return CallRecord(
        prompt_id=prompt.prompt_id,
        model=backend.name,
        ok=True,
        started_at=started,
        finished_at=time.time(),
        answer=res.text,
        finish_reason=res.finish_reason,
        input_tokens=res.prompt_tokens,
        output_tokens=res.completion_tokens,
        usage_source=res.usage_source,
        cost_usd=cost,
        ttft_s=res.ttft_s,
        latency_s=res.latency_s,
        attempts=res.attempts,
    )


def _error_record(
    prompt: Prompt, backend: Backend, err: BackendError, started: float, t0: float
) -> CallRecord:
    return CallRecord(
        prompt_id=prompt.prompt_id,
        model=backend.name,
        ok=False,
        started_at=started,
        finished_at=time.time(),
        latency_s=time.perf_counter() - t0,
        error_kind=type(err).__name__,
        error_message=err.message,
        http_status=err.status,
    )


async def acollect(
    prompts: Sequence[Prompt],
    catalog: Catalog,
    store: str | Path | AnswerStore,
    *,
    models: Sequence[str] | None = None,
    limits: Mapping[str, BackendLimit] | None = None,
    spend_cap_usd: float | None = None,
    request: RequestSettings | None = None,
    give_up_after: int = 20,
    breaker: CircuitBreaker | None = None,
    progress: bool = True,
    run_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`collect` inside a running event loop."""
    request = request or RequestSettings()
    models = list(models) if models else catalog.names
    backends = {m: catalog.get(m) for m in models}  # UnknownModelError names the catalog
    limits = dict(limits) if limits is not None else backend_limits(models, {})
    if not set(models) <= set(limits):
        raise ValueError(f"collect: no limits for backend(s) {sorted(set(models) - set(limits))}")
    if not prompts:
        raise ValueError("collect: the prompt set is empty")
    cap = SpendCap(spend_cap_usd)
    own_store = not isinstance(store, AnswerStore)
    db = AnswerStore(store) if own_store else store
    t_start = time.perf_counter()
    try:
        db.add_prompts(prompts)
        done = db.answered(models)
        queues = {m: deque(p for p in prompts if (p.prompt_id, m) not in done) for m in models}
        todo = sum(map(len, queues.values()))
        skipped = len(prompts) * len(models) - todo
        run_id = db.start_run(
            {**(run_config or {}), "models": models, "request": asdict(request),
             "limits": {m: asdict(lim) for m, lim in limits.items()}},
            spend_cap_usd,
        )  # fmt: skip
        tallies = {m: _Tally() for m in models}
        nbytes = {
            p.prompt_id: len(p.prompt.encode("utf-8")) + len((request.system_prompt or "").encode())
            for p in prompts
        }
        breaker = breaker or CircuitBreaker()
        bar = _progress(todo, progress)

        async def worker(name: str, queue: deque[Prompt], limiter: Any) -> None:
            backend, tally = backends[name], tallies[name]
            max_tokens = request.max_tokens_for(backend)
            while queue and not cap.reached and tally.gave_up is None:
                prompt = queue.popleft()
                bound, _, _ = cost_bound(
                    backend.spec, nbytes[prompt.prompt_id], max_tokens, request.template_tokens
                )
                if limiter is not None:
                    await limiter.acquire()
                while breaker.is_open(name):  # a resting backend: wait, do not burn prompts on it
                    await asyncio.sleep(0.1)
                if not await cap.reserve(bound):
                    queue.appendleft(prompt)
                    return
                started, t0, billed = time.time(), time.perf_counter(), 0.0
                try:
                    res = await _ask(client, name, request.payload(prompt, max_tokens), request.stream)
                    rec = _answer_record(prompt, backend, res, started)
                    billed = rec.cost_usd or 0.0
                except CircuitOpen:
                    queue.appendleft(prompt)  # nothing was sent; try again when the circuit allows
                    continue
                except BackendError as err:
                    rec = _error_record(prompt, backend, err, started, t0)
                    billed = bound if isinstance(err, MAYBE_BILLED) else 0.0  # unknown bill: its bound
                finally:
                    await cap.settle(bound, billed)
                rec.reserved_usd, rec.run_id = bound, run_id
                rec.max_tokens, rec.temperature = max_tokens, request.temperature
                stored = db.record(rec)
                tally.calls += 1
                tally.spent += billed
                if rec.ok:
                    tally.answers += stored
                    tally.duplicates += not stored
                    tally.failures_in_row = 0
                else:
                    tally.errors += 1
                    tally.failures_in_row += 1
                    if give_up_after and tally.failures_in_row >= give_up_after:
                        tally.gave_up = (
                            f"{tally.failures_in_row} failed calls in a row, the last: {rec.error_message}"
                        )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(cap, tallies), refresh=False)

        async with BackendClient(catalog, breaker=breaker) as client:
            tasks = [
                worker(m, queues[m], limiter)
                for m in models
                for limiter in [limits[m].limiter()]
                for _ in range(limits[m].concurrency)
            ]
            await asyncio.gather(*tasks)
        if bar is not None:
            bar.close()
        for m in models:
            tallies[m].left = len(queues[m])
        elapsed = time.perf_counter() - t_start
        left = sum(t.left for t in tallies.values())
        gave_up = {m: t.gave_up for m, t in tallies.items() if t.gave_up}
        if cap.reached:
            stop = f"spend cap ${cap.cap_usd:.4f} reached: stopped launching with {left} call(s) left"
        elif gave_up:
            stop = f"gave up on backend(s) {sorted(gave_up)} with {left} call(s) left"
        else:
            stop = "done"
        db.finish_run(run_id, cap.spent, stop)
        calls = sum(t.calls for t in tallies.values())
        summary = {
            "store": str(db.path),
            "run_id": run_id,
            "prompts": len(prompts),
            "models": models,
            "already_answered": skipped,
            "calls": calls,
            "answers": sum(t.answers for t in tallies.values()),
            "errors": sum(t.errors for t in tallies.values()),
            "duplicates_refused": sum(t.duplicates for t in tallies.values()),
            "left": left,
            "spent_usd": cap.spent,
            "spend_cap_usd": cap.cap_usd,
            "cap_reached": cap.reached,
            "cap_overruns": cap.overruns,
            "gave_up": gave_up,
            "stop_reason": stop,
            "elapsed_s": elapsed,
            "calls_per_s": calls / elapsed if elapsed > 0 else None,
            "per_model": {
                m: {k: v for k, v in asdict(t).items() if k != "failures_in_row"} for m, t in tallies.items()
            },
        }
        (log.warning if stop != "done" else log.info)("collect: %s (store %s)", stop, db.path)
        return summary
    finally:
        if own_store:
            db.close()


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="call", desc="collect", dynamic_ncols=True, mininterval=0.2)


def _postfix(cap: SpendCap, tallies: Mapping[str, _Tally]) -> str:
    of = "" if cap.cap_usd is None else f" of ${cap.cap_usd:.4g}"
    errors = sum(t.errors for t in tallies.values())
    return f"${cap.spent:.4f}{of}, {errors} errors"


def collect(
    prompts: Sequence[Prompt], catalog: Catalog, store: str | Path | AnswerStore, **kwargs: Any
) -> dict[str, Any]:
    """Collect an answer from each model of ``catalog`` (or ``models``) for each prompt into ``store``.

    Keyword arguments as :func:`acollect`: ``models``, ``limits`` (backend name ->
    :class:`~router_ml.collect.pacing.BackendLimit`; default 8 in flight, no rate limit),
    ``spend_cap_usd`` (None: no cap), ``request`` (:class:`RequestSettings`), ``give_up_after``
    (stop asking a backend after this many failed calls in a row; 0: never), ``breaker``,
    ``progress`` (a tqdm bar with ETA and $ so far), ``run_config`` (stored with the run).
    Returns a summary: calls, answers, errors, spend, what is left and why the run stopped.
    Runs its own event loop (uvloop when installed); inside a running loop, await :func:`acollect`.
    """
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(acollect(prompts, catalog, store, **kwargs))


# ------------------------------------------------------------------------------------- config
def load_prompt_set(cfg: Mapping[str, Any]) -> list[Prompt]:
    """The prompts of a collect config: its ``prompts`` file, or its ``data`` adapter (not both)."""
    path, data = cfg.get("prompts"), cfg.get("data")
    if path and data:
        raise ValueError("collect: give either prompts=FILE or data=ADAPTER, not both")
    if path:
        return read_prompts(path)
    if data:
        return prompts_from_data(data, seed=int(cfg.get("seed") or 0))
    raise ValueError(
        "collect: no prompts; give prompts=FILE (JSONL or parquet) or a data adapter, e.g. "
        "data=llmrouter data.max_prompts=100"
    )


def collect_from_config(cfg: Any) -> dict[str, Any]:
    """Run the collection a composed ``conf/collect.yaml`` describes; the :func:`collect` summary."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    pool = cfg.get("collect") or {}
    if not pool.get("backends"):
        raise ValueError("collect: collect.backends must name a backend catalog (a YAML file or a folder)")
    catalog = Catalog.load(pool["backends"])
    models = cfg.get("models") or catalog.names
    unknown = [m for m in models if m not in catalog]
    if unknown:
        raise ValueError(
            f"collect: models {unknown} are not in the catalog {pool['backends']} {catalog.names}"
        )
    stray = sorted(set(pool.get("limits") or {}) - set(catalog.names))
    if stray:
        raise ValueError(
            f"collect: collect.limits names backend(s) {stray} absent from the catalog {catalog.names}"
        )
    prompts = load_prompt_set(cfg)
    limits = backend_limits(models, pool, where=f"collect config ({pool['backends']})")
    request = RequestSettings(**(cfg.get("request") or {}))
    with AnswerStore(cfg["store"], synchronous=cfg.get("synchronous", "NORMAL")) as store:
        return collect(
            prompts,
            catalog,
            store,
            models=models,
            limits=limits,
            spend_cap_usd=cfg.get("spend_cap_usd"),
            request=request,
            give_up_after=int(cfg.get("give_up_after") or 0),
            progress=bool(cfg.get("progress", True)),
            run_config=cfg,
        )
