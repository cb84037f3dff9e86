"""The routing engine behind both the proxy and the in-process SDK.

One request: validate -> resolve the ``model`` field (``"router"``, ``"router:<policy>[:<knob>]"``
or a backend's own name, which bypasses routing) -> keep to the backends that have what the request
needs (tools, image input, JSON mode, room in the context window: :mod:`~.request_needs`; a 400
when none has) -> decide (LearnedRouter + DecisionLayer, micro-batched
in a worker thread so the event loop keeps serving, inline when nothing else is in flight:
:mod:`~router_ml.serving.decider`) -> call the chosen backend with the decision's
fallback chain (:class:`~router_ml.backends.client.BackendClient`) -> book spend in the shared
ledger, measured latency in the latency model, one line in the routing log and the metrics.

With a spend cap (the operator's ``budget_usd`` per ``period``, or a budgeted policy's hard cap)
every request, routed or pass-through, first reserves its cost bound in the ledger and is refused
with a 429 when it does not fit; booking settles the hold, a failure releases it
(:mod:`~router_ml.serving.budget`).

``aliases`` maps the router's model names onto catalog backends (a checkpoint trained on public
models served by other names); router models with no backend are never chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from router_ml.backends.capabilities import describe, exclusions, lacking
from router_ml.backends.catalog import Catalog
from router_ml.backends.client import BackendClient
from router_ml.backends.results import AllBackendsFailed, BackendError, BadRequest, ChatResult, CircuitOpen
from router_ml.backends.streams import ChatStream
from router_ml.decision.base import BudgetExhausted, PolicyError, RoutingDecision
from router_ml.decision.costs import CostModel, OutputLengthModel
from router_ml.decision.latency import LatencyModel
from router_ml.decision.layer import DecisionLayer
from router_ml.decision.measured import MeasuredFigures
from router_ml.decision.policies import build_policy
from router_ml.log_repeats import limit_repeats
from router_ml.serving.budget import BudgetScope, SpendGuard
from router_ml.serving.chat_request import validate_chat
from router_ml.serving.decider import Decider
from router_ml.serving.engine_support import (
    AliasedLatency,
    decision_headers,
    knob_value,
)
from router_ml.serving.openai_errors import ApiError
from router_ml.serving.request_needs import needs_of, passthrough_error, unservable_error

log = limit_repeats(logging.getLogger(__name__))

ROUTER_MODEL = "router"


@dataclass
class Outcome:
    """What a finished request produced, for logs, metrics and headers."""

    request_id: str
    route: str  # "router" | "passthrough"
    decision: RoutingDecision | None
    layer: DecisionLayer | None = None
    result: ChatResult | None = None
    stream: ChatStream | None = None
    headers: dict[str, str] = field(default_factory=dict)
    decision_s: float = 0.0
    prompt: str | None = None  # set while a finished answer waits to be booked (``book_later``)
    routed_prompt: str = ""  # the text the router classifies (:func:`~.chat_request.prompt_of`)
    reserved_usd: float | None = None  # the cost bound held in the ledger until booked or released
    key: Any | None = None  # the virtual API key the request came with (:mod:`~.keys`)
    scopes: list[BudgetScope] = field(default_factory=list)  # the key's and its team's budgets
    rate_admitted: bool = False  # the request holds a place in its key's rate window


class RoutingEngine:
    """``router`` (a LearnedRouter) + ``catalog`` + policies + shared ledger + routing log.

    ``policies``: name -> policy config (``router_ml/conf/policy`` entries); ``default_policy`` serves
    ``model="router"``; the policies are fitted at start-up (auto tiers, thresholds, the pacing
    curve) on the router's policy fit set (its checkpoint carries it) priced by this catalog;
    ``max_batch``: the most prompts embedded in one encoder call when requests arrive together;
    ``budget_usd``: the operator's spend cap per ``period`` over every request, routed or
    pass-through (None: only budgeted policies cap); ``default_max_tokens``: the output cap written
    into a capped request that names none (so its cost bound holds); ``reservation_ttl_s``: how long
    a hold outlives a replica that crashed; ``keys``: a :class:`~router_ml.serving.keys.KeyGate`
    (requests then must carry one of its virtual API keys); ``queue_aware``: the live queues of vLLM
    backends raise their models' first-token estimates (:meth:`refresh_vllm_metrics`; off: only the
    figures of their finished requests feed them, queueing included, as before).
    """

    def __init__(
        self,
        router: Any,
        catalog: Catalog,
        policies: Mapping[str, Mapping[str, Any]],
        default_policy: str = "utility",
        ledger: Any | None = None,
        routing_log: Any | None = None,
        aliases: Mapping[str, str] | None = None,
        session: str | None = None,
        period: str = "day",
        on_finish: Callable[[Outcome], None] | None = None,
        max_batch: int = 32,
        budget_usd: float | None = None,
        default_max_tokens: int = 1024,
        reservation_ttl_s: float = 600.0,
        keys: Any | None = None,
        queue_aware: bool = True,
    ):
        from router_ml.decision.ledger import MemoryLedger

        self.queue_aware = queue_aware
        self.router, self.catalog = router, catalog
        self.aliases = {m: (aliases or {}).get(m, m) for m in router.models}
        for model, backend in self.aliases.items():
            if backend != model and backend not in catalog:
                raise ValueError(
                    f"alias {model!r} -> {backend!r}: no such backend in the catalog {catalog.names}"
                )
        self.served = [m for m in router.models if self.aliases[m] in catalog]
        if not self.served:
            raise ValueError(
                f"none of the router's models {router.models} has a backend in the catalog {catalog.names}; "
                "map them with aliases"
            )
        if default_policy not in policies:
            raise ValueError(f"default policy {default_policy!r} is not among {sorted(policies)}")
        self.default_policy = default_policy
        self.ledger = ledger if ledger is not None else MemoryLedger()
        self.routing_log = routing_log
        self.on_finish = on_finish
        self.keys = keys
        # request ids: a random prefix per process start and a counter (unique across restarts and
        # replicas without an os.urandom call per request, which costs ~10 us right after the encoder)
        self._id_prefix, self._ids = secrets.token_hex(8), itertools.count()
        # the decision layer prices and times the ROUTER's model names with their backends' specs
        pool = catalog.pool()
        from router_ml.decision.spec import ModelPool

        self.pool = ModelPool([dataclasses.replace(pool.get(self.aliases[m]), name=m) for m in self.served])
        # a checkpoint trained on a collection store carries its measured output lengths and the
        # TTFT / decode speed of its models (for backends whose catalog entry sets none)
        measured = MeasuredFigures.of_router(router)
        if measured is not None:
            self.pool = measured.fill_latency(self.pool)
        self.latency_model = LatencyModel(self.pool)
        self.cost_model = CostModel(self.pool, measured.output_model() if measured else OutputLengthModel())
        self.layers: dict[str, DecisionLayer] = {}
        for name, cfg in policies.items():
            self.layers[name] = DecisionLayer(
                build_policy(dict(cfg)),
                self.pool,
                self.cost_model,
                self.latency_model,
                ledger=self.ledger,
                session=session,
                period=period,
            )
        self._fit()
        # backend latency observations also feed the router-name latency model
        self.client = BackendClient(catalog, latency_model=AliasedLatency(self.latency_model, self.aliases))
        self.guard = SpendGuard(self.ledger, self.client, budget_usd, period, session, default_max_tokens,
                                reservation_ttl_s)  # fmt: skip
        # the last /metrics figures of each vLLM backend (for /health and the next delta); a backend
        # whose check or scrape failed is out of it and marked in backend_health
        self.vllm_seen: dict[str, dict[str, float | None]] = {}
        self.backend_health: dict[str, dict[str, Any]] = {}  # local backend -> its last check
        self._inflight = 0  # requests waiting on a backend or streaming (decisions go inline when 0)
        self.decider = Decider(router, self.served, lambda: self._inflight > 0, max_batch=max_batch)
        # a request no longer than this (prompt bytes + overhead + output) fits every context window
        windows = [b.spec.context_window for b in catalog if b.spec.context_window is not None]
        self._min_window = min(windows, default=float("inf"))
        self._warm_up()

    def _warm_up(self) -> None:
        """Route a prompt through the whole decision path once before serving: the first pass loads
        tokenizers and starts the encoder's workers (seconds on a CPU), which the first client
        would otherwise wait for. Fitting from the policy fit set no longer encodes anything."""
        t = time.perf_counter()
        # a spent budget refuses requests, not the start (the encoder has run by then)
        with contextlib.suppress(BudgetExhausted):
            self.router.route_batch(
                ["Warm-up: summarise this sentence."],
                allowed_models=self.served,
                policy=self.layers[self.default_policy],
            )
        log.info("decision path warmed up in %.2f s", time.perf_counter() - t)

    def _fit(self) -> None:
        """Fit every policy on the router's policy fit set, over the served models at the catalog's prices."""
        fit = getattr(self.router, "policy_fit", None)
        if fit is None:
            name = self.router.metadata.get("name", "router")
            raise ValueError(
                f"checkpoint {name!r} carries no policy fit set (written before router-ml stored one), so "
                "the proxy cannot fit its policies; re-export it, which adds one: python -m "
                "experiments.export run=<checkpoint folder> to=<new folder> (in a source checkout)"
            )
        est = fit.estimates(next(iter(self.layers.values())), self.served)
        for layer in self.layers.values():
            layer.fit(est)

    async def refresh_vllm_metrics(self) -> dict[str, dict[str, float | None]]:
        """One pass over the local backends (kind ``vllm``): a health check of each (``/health``)
        and, of vLLM servers, a scrape of ``/metrics``. The TTFT (net of queueing) and decode speed
        of the requests each finished since the last pass feed the latency model; with
        ``queue_aware``, its waiting and running requests and KV-cache use give the first-token
        estimate of the models it serves now (:func:`~router_ml.backends.vllm_metrics.vllm_queue_load`),
        so latency-aware policies move traffic off a saturated server. Queue depth and KV-cache use
        are kept for ``/health``. A backend whose check or scrape fails is marked in
        :attr:`backend_health`, its last metrics are dropped from :attr:`vllm_seen` (stale figures
        are never served as live) and so is its live load (the static estimate stands)."""
        from router_ml.backends.vllm_metrics import apply_vllm_metrics, vllm_queue_load

        for backend in self.catalog:
            if backend.kind != "vllm":
                continue
            name, now = backend.name, time.time()
            engine = (backend.launch or {}).get("engine", "vllm")
            current = None
            try:
                await self.client.check_health(name)
            except Exception as e:  # down
                self._mark_unhealthy(name, e, now, "check")
                continue
            if engine == "vllm":
                try:
                    current = await self.client.scrape_metrics(name)
                except Exception as e:  # a server without /metrics (404: llama.cpp) is just unmeasured
                    if not (isinstance(e, httpx.HTTPStatusError) and e.response.status_code == 404):
                        self._mark_unhealthy(name, e, now, "metrics")
                        continue
            prev = self.backend_health.get(name) or {}
            self.backend_health[name] = {"status": "ok", "checked_at": now, "last_ok_at": now,
                                         "metrics": current is not None}  # fmt: skip
            if prev.get("status") not in (None, "ok"):
                log.warning("backend %r is healthy again", name)
            if current is not None:
                previous = self.vllm_seen.get(name)
                apply_vllm_metrics(self.client.latency_model, name, current, previous, self.queue_aware)
                self._set_load(name, vllm_queue_load(name, current, previous))
                self.vllm_seen[name] = current
            else:
                self._set_load(name, None)
        return dict(self.vllm_seen)

    def _set_load(self, backend: str, load: Any) -> None:
        """The live load of ``backend`` onto the router models it serves (None: forget it)."""
        for model in self.client.latency_model.by_backend.get(backend, []):
            if model in self.pool:
                self.latency_model.set_load(model, load if self.queue_aware else None)

    def _mark_unhealthy(self, name: str, err: BaseException, now: float, what: str) -> None:
        """Record that ``name``'s health check or metrics scrape failed; forget its stale metrics."""
        prev = self.backend_health.get(name) or {}
        failed = "down" if what == "check" or isinstance(err, httpx.TransportError) else "metrics_failed"
        if prev.get("status") in (None, "ok"):
            log.warning("backend %r: %s (%s: %s)", name, failed, type(err).__name__, err)
        self.backend_health[name] = {
            "status": failed, "error": f"{type(err).__name__}: {err}"[:300], "checked_at": now,
            "last_ok_at": prev.get("last_ok_at"), "metrics": False,
        }  # fmt: skip
        self.vllm_seen.pop(name, None)
        self._set_load(name, None)

    async def poll_vllm_metrics(self, interval_s: float = 10.0) -> None:
        """:meth:`refresh_vllm_metrics` every ``interval_s`` until cancelled."""
        while True:
            await self.refresh_vllm_metrics()
            await asyncio.sleep(interval_s)

    async def aclose(self) -> None:
        await self.client.aclose()
        self.decider.close()

    # ---- resolution and decision ---------------------------------------------------------------
    def model_ids(self) -> list[str]:
        """What ``/v1/models`` lists: the router entries, then the backends."""
        return [ROUTER_MODEL, *(f"{ROUTER_MODEL}:{p}" for p in self.layers), *self.catalog.names]

    def resolve(self, model: str) -> tuple[str, DecisionLayer | None, dict[str, Any]]:
        """``(route, layer, constraints)`` for a request's ``model`` field."""
        if model in self.catalog:
            return "passthrough", None, {}
        if model == ROUTER_MODEL or model.startswith(ROUTER_MODEL + ":"):
            parts = model.split(":", 2)
            name = parts[1] if len(parts) > 1 and parts[1] else self.default_policy
            if name not in self.layers:
                raise ApiError(
                    404, f"unknown routing policy {name!r}; known: {sorted(self.layers)}", param="model",
                    code="model_not_found",
                )  # fmt: skip
            layer = self.layers[name]
            constraints: dict[str, Any] = {}
            if len(parts) == 3 and parts[2]:
                knob = layer.policy.knob
                if knob is None:
                    raise ApiError(
                        400, f"policy {name!r} has no knob to set (got {parts[2]!r})", param="model"
                    )
                constraints[knob] = knob_value(parts[2])
            return "router", layer, constraints
        raise ApiError(
            404, f"unknown model {model!r}; use 'router', 'router:<policy>[:<knob>]' or one of {self.catalog.names}",
            param="model", code="model_not_found",
        )  # fmt: skip

    async def decide(self, prompt: str, layer: DecisionLayer, constraints: dict[str, Any]) -> RoutingDecision:
        """The decision for one prompt (micro-batched with concurrent ones; see :mod:`.decider`)."""
        return (await self._decide(prompt, layer, constraints))[0]

    async def _decide(
        self,
        prompt: str,
        layer: DecisionLayer,
        constraints: dict[str, Any],
        allowed: list[str] | None = None,
    ) -> tuple[RoutingDecision, float]:
        got, encode_s = await self.decider.decide(prompt, layer, constraints, allowed)
        try:
            if isinstance(got, BaseException):
                raise got
            return got, encode_s
        except BudgetExhausted as e:
            raise ApiError(429, str(e), type="insufficient_quota", code="budget_exhausted") from None
        except PolicyError as e:
            raise ApiError(400, str(e), param="model") from None

    # ---- one request ---------------------------------------------------------------------------
    async def complete(
        self,
        body: Mapping[str, Any],
        max_prompt_chars: int = 200_000,
        book_later: bool = False,
        key: Any | None = None,
    ) -> Outcome:
        """Validate, route and call; a stream is returned open (iterate ``outcome.stream``).

        ``key``: the virtual API key the request came with (``keys.authenticate``), checked by the
        engine's ``keys`` (:class:`~router_ml.serving.keys.KeyGate`): its models bound the candidates, its rate
        limits admit the request, its and its team's budgets are held with the proxy's cap.

        A finished answer is booked (spend, latency, routing log, metrics) before this returns;
        with ``book_later`` the caller books it with :meth:`book` once the answer is on its way
        to the client (the proxy: booking is then off the response's critical path)."""
        req, prompt = validate_chat(body, max_prompt_chars)
        model = req["model"]
        route, layer, constraints = self.resolve(model)
        request_id = f"chatcmpl-{self._id_prefix}{next(self._ids):016x}"
        stream = req.get("stream", False)
        payload = {k: v for k, v in body.items() if k != "model"}
        decision, encode_s, t0 = None, 0.0, time.perf_counter()
        excluded = self._excluded(req, body, model if route == "passthrough" else None)
        gate = self.keys
        if key is not None and key.models:  # the key's models are a ceiling on the candidates
            if route == "passthrough" and not key.allows([model]):
                raise gate.forbidden(key, model)
            excluded = dict(excluded)
            for m in self.served:
                if not key.allows([m, self.aliases[m]]):
                    excluded.setdefault(self.aliases[m], []).append("api_key")
            if route == "router" and all(self.aliases[m] in excluded for m in self.served):
                raise gate.forbidden(key, model)
        if route == "router":
            allowed = [m for m in self.served if self.aliases[m] not in excluded] if excluded else None
            decision, encode_s = await self._decide(prompt, layer, constraints, allowed)
            if excluded:  # say which capability (or the key) excluded which backends
                said = describe(excluded)
                decision.reason += f"; {said}" if said else ""
                by_key = [b for b, why in excluded.items() if "api_key" in why]
                if by_key:
                    decision.reason += f"; API key {key.name!r} excluded {', '.join(by_key)}"
            # several router models may share one backend: each backend once, in the decision's order;
            # never one that lacks a capability the request needs
            chain = list(dict.fromkeys(self.aliases[m] for m in [decision.model, *decision.fallbacks]))
            chain = [b for b in chain if b not in excluded]
            if decision.max_tokens and not (
                payload.get("max_tokens") or payload.get("max_completion_tokens")
            ):
                payload["max_tokens"] = int(decision.max_tokens)
        else:
            chain = [model]
        outcome = Outcome(request_id, route, decision, layer, decision_s=time.perf_counter() - t0)
        outcome.routed_prompt = prompt
        outcome.headers = decision_headers(decision, outcome.decision_s)
        if decision is not None:
            outcome.headers["x-router-encode-ms"] = f"{encode_s * 1000:.2f}"
        cap, reserved = self.guard.cap(layer, constraints), None
        if key is not None:
            outcome.key, outcome.scopes = key, gate.scopes(key)
        capped = [sc for sc in outcome.scopes if sc.cap_usd is not None]
        if cap is not None or capped or (key is not None and key.tpm is not None):
            # admit under the key's rate limits, then hold the cost bound in every budget before
            # any backend call (a 429 when either does not fit)
            bounds, tokens = self.guard.plan(chain, payload, req["messages"])
            if key is not None and gate.limited(key):
                gate.admit(key, request_id, tokens)
                outcome.rate_admitted = True
            if cap is not None or capped:
                try:
                    chain, reserved = self.guard.hold(request_id, chain, bounds, cap, outcome.scopes)
                except ApiError:
                    if outcome.rate_admitted:
                        gate.release(key, request_id)
                    raise
                outcome.reserved_usd = reserved
        elif key is not None and gate.limited(key):  # rpm alone: no token bound needed
            gate.admit(key, request_id, 0)
            outcome.rate_admitted = True
        if reserved is not None:  # the cost bound held for this call (what it may cost at most)
            outcome.headers["x-router-reserved-usd"] = f"{reserved:.8f}"
        self._inflight += 1  # until _finish
        try:
            got = await self.client.chat_with_fallback(chain, payload, stream=stream)
        except BadRequest as e:
            self._finish(outcome, prompt, error=e)
            raise ApiError(e.status or 400, f"backend {e.backend} rejected the request: {e}") from None
        except (AllBackendsFailed, BackendError) as e:
            self._finish(outcome, prompt, error=e)
            wait = [self.client.breaker.retry_in(n) for n in chain]
            if all(w is not None for w in wait) and isinstance(getattr(e, "last", e), CircuitOpen):
                raise ApiError(  # every backend rests: say when the first one takes a trial again
                    503, f"backend(s) {chain} are resting after repeated failures: {e}", type="api_error",
                    code="circuit_open", headers={"retry-after": str(max(1, math.ceil(min(wait))))},
                ) from None  # fmt: skip
            raise ApiError(
                502, f"no backend answered: {e}", type="api_error", code="backends_failed"
            ) from None
        except BaseException:  # cancelled (the client went away) or a bug: nothing to book
            self._inflight -= 1
            self._release(outcome)
            raise
        if isinstance(got, ChatStream):
            outcome.stream = got
        else:
            outcome.result = got
            if book_later:
                outcome.prompt = prompt
            else:
                self._finish(outcome, prompt)
        outcome.headers["x-router-served-model"] = self._served_name(got)
        if isinstance(got, ChatResult) and len(got.tried) > 1:  # why the earlier backends were left
            outcome.headers["x-router-tried"] = ",".join(got.tried)
            outcome.headers["x-router-fallback-errors"] = (
                " | ".join(got.errors)[:512].encode("ascii", "replace").decode()
            )
        return outcome

    def _excluded(self, req: Any, body: Mapping[str, Any], passthrough: str | None) -> dict[str, list[str]]:
        """``{backend: what it lacks}`` of the request's needs (tools, image input, JSON mode, room in
        the context window) over the served backends; a plain request that fits every window
        costs no more than reading its fields. Raises the 400 when the named backend
        (``passthrough``), or every served one, lacks something."""
        needs = needs_of(req, body, self._min_window)
        if needs is None or (not needs.features and needs.fits(self._min_window)):
            return {}
        if passthrough is not None:
            backend = self.catalog.get(passthrough)
            missing = lacking(backend, needs, self.client.count_tokens)
            if missing:
                capable = [b.name for b in self.catalog if not lacking(b, needs, self.client.count_tokens)]
                raise passthrough_error(passthrough, missing, needs, capable)
            return {}
        served = {self.aliases[m] for m in self.served}
        backends = [b for b in self.catalog if b.name in served]  # in the catalog's order
        excluded = exclusions(backends, needs, self.client.count_tokens)
        if len(excluded) == len(backends):
            raise unservable_error(needs, excluded)
        return excluded

    def _release(self, outcome: Outcome) -> None:
        """Drop every hold of a request that reached no backend (budgets, its key's rate window)."""
        if outcome.reserved_usd is not None:
            self.guard.release(outcome.request_id)
            self.guard.release(outcome.request_id, outcome.scopes)
        if outcome.rate_admitted:
            self.keys.release(outcome.key, outcome.request_id)

    def book(self, outcome: Outcome) -> None:
        """Book a finished answer that :meth:`complete` returned unbooked (``book_later``)."""
        if outcome.prompt is not None:
            prompt, outcome.prompt = outcome.prompt, None
            self._finish(outcome, prompt)

    def _served_name(self, got: ChatResult | ChatStream) -> str:
        if isinstance(got, ChatResult):
            return got.backend
        return got.tried[-1] if got.tried else ""

    async def iterate(self, outcome: Outcome, prompt: str) -> AsyncIterator[dict[str, Any]]:
        """Yield a stream's chunks; books the request when it ends (or breaks)."""
        assert outcome.stream is not None
        error: BaseException | None = None
        try:
            async for chunk in outcome.stream:
                yield chunk
        except BaseException as e:  # the client went away or every fallback failed mid-stream
            error = e
            raise
        finally:
            await outcome.stream.aclose()  # an abandoned stream counts what it generated here
            outcome.result = outcome.stream.result  # partial when it failed: booked as generated
            self._finish(outcome, prompt, error=error)

    def _booked_model(self, d: RoutingDecision | None, served: str | None) -> str | None:
        """The model a call is booked under (the ledger's ``model``; ``backend`` says who served
        it): the one the router decided on, also when a fallback served the call; for a
        pass-through, the first router model aliased to the backend named (else its own name)."""
        if served is None:
            return None
        if d is not None and d.model in self.pool:
            return d.model
        return next((m for m, b in self.aliases.items() if b == served), served)

    def _finish(self, outcome: Outcome, prompt: str, error: BaseException | None = None) -> None:
        """Book spend, latency, the routing log line and the metrics of a finished request."""
        self._inflight -= 1
        res, d = outcome.result, outcome.decision
        served = res.backend if res is not None else None
        router_name = self._booked_model(d, served)
        cost = res.cost_usd if res is not None and res.cost_usd is not None else 0.0
        if res is not None and router_name in self.pool:
            layer = outcome.layer or self.layers[self.default_policy]
            layer.record(d if d is not None else router_name, cost, outcome.request_id, backend=served)
        elif res is not None:  # a backend outside the router's pool: spend still counts
            self.ledger.record(
                cost, served, request_id=outcome.request_id, session=self.guard.session, backend=served
            )
        if res is None:  # nothing answered: nothing to settle
            self._release(outcome)
        elif outcome.key is not None:  # the key's and its team's spend and tokens
            try:
                self.guard.settle(outcome.request_id, outcome.scopes, cost, served or "unknown")
            except Exception:  # a key store out of reach: its holds lapse after their ttl
                log.exception("key spend of %s could not be booked", outcome.request_id)
            if outcome.rate_admitted:
                used = (res.prompt_tokens or 0) + (res.completion_tokens or 0)
                self.keys.settle(outcome.key, outcome.request_id, used)
        if self.routing_log is not None:
            try:
                self.routing_log.log(
                    outcome.request_id,
                    prompt,
                    d,
                    model=(d.model if d is not None else served) or "unknown",
                    served_model=served,
                    fallbacks_tried=list(res.tried if res is not None else []),
                    latency_s=res.latency_s if res is not None else None,
                    ttft_s=res.ttft_s if res is not None else None,
                    input_tokens=res.prompt_tokens if res is not None else None,
                    output_tokens=res.completion_tokens if res is not None else None,
                    cost_usd=cost if res is not None else None,
                    outcome="ok" if error is None else type(error).__name__,
                    error=None if error is None else str(error)[:500],
                    stream=outcome.stream is not None,
                )
            except Exception:  # the log never fails a request
                log.exception("routing log write failed for %s", outcome.request_id)
        if self.on_finish is not None:
            self.on_finish(outcome)
