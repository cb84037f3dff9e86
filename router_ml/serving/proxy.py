"""The OpenAI-compatible routing proxy (FastAPI).

    router-ml serve --ckpt CHECKPOINT --backends conf/backends/local.yaml [--policy utility] [--port 8000]

Endpoints: ``POST /v1/chat/completions`` (SSE streaming and not), ``GET /v1/models`` (router entries
and backends), ``GET /health`` (``status`` "degraded" and the failing backend under ``checks`` while
a local server's health check or metrics scrape fails; its stale metrics are dropped), ``GET /metrics``
(Prometheus; a stream is counted when it ends, a failed one under its in-band error's status). ``model="router"`` routes with the
default policy, ``model="router:<policy>[:<knob>]"`` picks policy and knob per request, a backend's
own name passes through. The response's ``model`` is the backend that answered; ``x-router-*``
headers carry the decision (task, predicted quality, expected cost, reason, fallbacks).

The chat route is a plain ASGI handler (:mod:`~router_ml.serving.asgi_chat`), ahead of FastAPI's
middleware. Malformed requests get an OpenAI-style 4xx before any backend is called (body size limit
included); a backend's 4xx is returned as is, never retried elsewhere; when no backend answers the
client gets a 502 (a 503 with ``Retry-After`` while every backend's circuit is open). With a spend
cap every request reserves its cost bound first and gets a 429 ``budget_exhausted`` when it does not
fit (:mod:`~router_ml.serving.budget`). Auth: virtual API keys from a key store (the engine's
``keys``: per-key budgets, rate limits and models, :mod:`~router_ml.serving.keys`; ``/metrics``
counts requests, spend and tokens per key), or one bearer key for the proxy itself (``api_key_env``:
the NAME of the env var holding it).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from router_ml.serving.asgi_chat import ChatRoute
from router_ml.serving.engine import Outcome, RoutingEngine
from router_ml.serving.openai_errors import ApiError

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ProxySettings:
    max_body_bytes: int = 512 * 1024
    max_prompt_chars: int = 200_000
    api_key_env: str | None = None  # the NAME of the env var holding the proxy's own key
    metrics_poll_s: float | None = 10.0  # how often vLLM backends' /metrics feed live latency (None: never)


class Metrics:
    """Prometheus metrics of one proxy (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "router_ml_requests", "Requests by route and HTTP status", ["route", "status"], registry=r
        )
        self.decisions = Counter(
            "router_ml_decisions", "Routing decisions by chosen model", ["model"], registry=r
        )
        self.served = Counter(
            "router_ml_served", "Answers by the backend that produced them", ["backend"], registry=r
        )
        self.fallbacks = Counter("router_ml_fallbacks", "Requests answered by a fallback backend", registry=r)
        self.spend = Counter("router_ml_spend_usd", "Spend in USD by backend", ["backend"], registry=r)
        self.ttft = Histogram(
            "router_ml_ttft_seconds",
            "Time to first token (streams)",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "router_ml_latency_seconds", "Request latency", ["backend"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.decision_time = Histogram(
            "router_ml_decision_seconds", "Time to decide (embedding + policy)", buckets=LATENCY_BUCKETS, registry=r
        )  # fmt: skip
        # per virtual API key, labelled by its name and public id (never its secret)
        self.key_requests = Counter(
            "router_ml_key_requests", "Requests by API key and HTTP status", ["key", "key_id", "status"], registry=r
        )  # fmt: skip
        self.key_spend = Counter(
            "router_ml_key_spend_usd", "Spend in USD by API key", ["key", "key_id", "team"], registry=r
        )
        self.key_tokens = Counter(
            "router_ml_key_tokens", "Tokens used (input + output) by API key", ["key", "key_id"], registry=r
        )

    def keyed(self, key: Any, status: int) -> None:
        """Count one answer to a request of ``key`` (None: no key)."""
        if key is not None:
            self.key_requests.labels(key.name, key.id, str(status)).inc()

    def finished(self, outcome: Outcome) -> None:
        res = outcome.result
        if outcome.decision is not None:
            self.decisions.labels(outcome.decision.model).inc()
            self.decision_time.observe(outcome.decision_s)
        if res is None:
            return
        if outcome.key is not None:
            key = outcome.key
            self.key_spend.labels(key.name, key.id, key.team or "").inc(res.cost_usd or 0.0)
            self.key_tokens.labels(key.name, key.id).inc(
                (res.prompt_tokens or 0) + (res.completion_tokens or 0)
            )
        self.served.labels(res.backend).inc()
        if len(res.tried) > 1:
            self.fallbacks.inc()
        if res.cost_usd:
            self.spend.labels(res.backend).inc(res.cost_usd)
        if res.ttft_s is not None:
            self.ttft.labels(res.backend).observe(res.ttft_s)
        self.latency.labels(res.backend).observe(res.latency_s)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


class _ProxyApp(FastAPI):
    """FastAPI, with ``POST /v1/chat/completions`` answered by a plain ASGI handler (the hot path)."""

    def __init__(self, chat: ChatRoute, **kw: Any) -> None:
        super().__init__(**kw)
        self.chat_route = chat

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST":
            await self.chat_route(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(engine: RoutingEngine, settings: ProxySettings | None = None) -> FastAPI:
    """The FastAPI app around a :class:`RoutingEngine`."""
    settings = settings or ProxySettings()
    metrics = Metrics()
    engine.on_finish = metrics.finished
    key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    if settings.api_key_env and not key:
        raise ValueError(f"proxy auth: env var {settings.api_key_env!r} is not set")
    if settings.api_key_env and engine.keys is not None:
        raise ValueError("proxy auth: give either a key store (virtual API keys) or api_key_env, not both")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gc.collect()
        gc.freeze()  # start-up objects leave the collector's generations: no long full-GC pauses
        poller = None
        if settings.metrics_poll_s:
            # a live queue counts for three polls (5 s at least: a poll can be late on a busy host);
            # a scrape that fails drops it at once
            engine.latency_model.load_max_age_s = max(3 * settings.metrics_poll_s, 5.0)
            poller = asyncio.create_task(engine.poll_vllm_metrics(settings.metrics_poll_s))
        yield
        if poller is not None:
            poller.cancel()
        await engine.aclose()

    def authorize(given: str) -> Any:
        """``given``: the request's ``Authorization`` header ("" when absent); the request's
        virtual API key when the engine has a key store, else None."""
        if engine.keys is not None:
            return engine.keys.authenticate(given)
        if key is None:
            return None
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(
                401, "invalid or missing proxy API key", type="authentication_error", code="invalid_api_key"
            )
        return None

    app = _ProxyApp(
        ChatRoute(engine, metrics, settings, authorize),
        title="router-ml proxy",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:  # pragma: no cover - last resort
        log.exception("unexpected error")
        return _error(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    @app.post(CHAT_PATH)
    async def chat_completions() -> None:  # pragma: no cover - listed for 405s; served by ChatRoute
        raise AssertionError("POST /v1/chat/completions is answered by ChatRoute before FastAPI")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            authorize(request.headers.get("authorization", ""))
        except ApiError as e:
            return _error(e)
        now = int(time.time())
        data = [
            {"id": m, "object": "model", "created": now, "owned_by": "router-ml"} for m in engine.model_ids()
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        breaker = engine.client.breaker
        backends = {name: breaker.state(name) for name in engine.catalog.names}
        latency = engine.latency_model.snapshot().to_dict(orient="records")
        now = time.time()
        checks = {
            name: {**h, "checked_s_ago": round(now - h["checked_at"], 3)}
            for name, h in engine.backend_health.items()
        }
        return JSONResponse(
            {
                # "degraded" while a local backend's health check or metrics scrape fails
                "status": "ok" if all(h["status"] == "ok" for h in checks.values()) else "degraded",
                "backends": backends,
                "checks": checks,
                "policies": sorted(engine.layers),
                "latency": latency,
                "vllm": engine.vllm_seen,
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` with uvicorn until stopped. Once it listens, the address (the port bound, also
    for ``port=0``) is printed on stderr and logged: uvicorn's own start-up lines are off (its
    log level is ``warning``), and an operator must see where the proxy answers."""
    import sys

    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if not self.started:
                return
            for srv in getattr(self, "servers", []):
                for sock in srv.sockets:
                    addr = sock.getsockname()
                    where = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                    line = f"router-ml proxy listening on http://{where}:{addr[1]} (POST {CHAT_PATH})"
                    print(line, file=sys.stderr, flush=True)
                    log.info(line)

    _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)).run()


def build_engine(
    ckpt: str,
    backends: str,
    policy: str = "utility",
    ledger: str | None = None,
    routing_log: str | None = None,
    log_prompts: str = "hash",
    aliases: dict[str, str] | None = None,
    policy_dir: str | None = None,
    period: str = "day",
    budget_usd: float | None = None,
    default_max_tokens: int = 1024,
    keys: str | None = None,
) -> RoutingEngine:
    """A :class:`RoutingEngine` from files: checkpoint, backend catalog and the policy configs
    (``policy_dir``; default: the package's own, ``router_ml/conf/policy/``); ``keys``: a key
    store (a path, ``sqlite:<path>`` or ``redis://...``), whose virtual API keys requests must carry."""
    from router_ml.backends.catalog import Catalog
    from router_ml.decision.ledger import open_ledger
    from router_ml.router import LearnedRouter
    from router_ml.serving.engine_support import load_policy_configs

    gate = None
    if keys:
        from router_ml.serving.keys import KeyGate, open_key_store

        if ledger and _same_file(ledger, keys):
            raise ValueError(
                f"the key store {keys!r} is the spend ledger {ledger!r}: key spend would count twice in the "
                "proxy's cap; give the keys their own file"
            )
        gate = KeyGate(open_key_store(keys))
    rlog = None
    if routing_log:
        from router_ml.serving.routing_log import RoutingLog

        rlog = RoutingLog(routing_log, log_prompts=log_prompts)
    return RoutingEngine(
        LearnedRouter.from_pretrained(ckpt),
        Catalog.load(backends),
        load_policy_configs(policy_dir),
        default_policy=policy,
        ledger=open_ledger(ledger),
        routing_log=rlog,
        aliases=aliases,
        period=period,
        budget_usd=budget_usd,
        default_max_tokens=default_max_tokens,
        keys=gate,
    )


def _same_file(a: str, b: str) -> bool:
    """True when two ledger / key store specs name the same SQLite file."""
    from pathlib import Path

    def path(spec: str) -> Path | None:
        if spec.startswith(("redis://", "rediss://", "unix://")) or spec in ("memory", ""):
            return None
        return Path(spec.removeprefix("sqlite:")).expanduser().resolve()

    pa = path(a)
    return pa is not None and pa == path(b)
