"""One attempt at a backend: the HTTP layer under :class:`~router_ml.backends.client.BackendClient`.

Plain ``http://`` backends (local vLLM, llama.cpp) go through :class:`~router_ml.backends.http11.FastHTTP`
(one socket write per request, a C response parser: about a seventh of ``httpx``'s CPU per call);
``https://`` backends, hosts behind an ``HTTP_PROXY`` and an injected ``http`` client use ``httpx``.
``plain_http`` (or ``$ROUTER_ML_HTTP_CLIENT``) swaps FastHTTP for aiohttp's or httpx's client, so
that ``experiments/bench_proxy.py --backend-client`` can repeat the measurement that kept it.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from router_ml.backends import anthropic
from router_ml.backends.breaker import CircuitBreaker
from router_ml.backends.catalog import Backend, Catalog, MissingSecret
from router_ml.backends.http11 import FastHTTP
from router_ml.backends.results import (
    RETRYABLE_STATUS,
    BackendError,
    BackendTimeout,
    BadRequest,
    ChatResult,
    _CallState,
    _within,
    cache_tokens,
    parse_retry_after,
    transport_error,
)
from router_ml.backends.streams import Upstream, _content_text, tool_call_text
from router_ml.decision.spec import UnknownModelError

if TYPE_CHECKING:
    from router_ml.decision.costs import CostModel
    from router_ml.decision.latency import LatencyModel


#: The client of plain ``http://`` backends: ``fast`` (:mod:`~router_ml.backends.http11`), or the
#: maintained ones it was measured against (``aiohttp``, ``httpx``); ``$ROUTER_ML_HTTP_CLIENT``
#: picks one for a whole process (``experiments/bench_proxy.py --backend-client``).
PLAIN_HTTP_CLIENTS = ("fast", "aiohttp", "httpx")
HTTP_CLIENT_ENV = "ROUTER_ML_HTTP_CLIENT"


def _proxied(url: httpx.URL) -> bool:
    """Whether an ``HTTP_PROXY`` / ``ALL_PROXY`` from the environment applies to ``url``."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get("http") or proxies.get("all")) and not urllib.request.proxy_bypass(url.host)


class HttpCalls:
    """State and single attempts of a backend client; see :class:`~router_ml.backends.client.BackendClient`."""

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
        fast_http: bool = True,
        plain_http: str | None = None,
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
        plain_http = plain_http or os.environ.get(HTTP_CLIENT_ENV) or "fast"
        if plain_http not in PLAIN_HTTP_CLIENTS:
            raise ValueError(
                f"plain_http / ${HTTP_CLIENT_ENV} = {plain_http!r}: use one of {PLAIN_HTTP_CLIENTS}"
            )
        self.plain_http = plain_http if fast_http and http is None else "httpx"
        self.fast_http = self.plain_http != "httpx"
        self._fast: Any = None  # FastHTTP (or AioHTTP) for plain http:// backends
        self._routes: dict[str, tuple[httpx.URL, bool]] = {}  # backend -> (chat URL, via self._fast)
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
        if self._fast is not None:
            await self._fast.aclose()
            self._fast = None
        if self._http is not None and self._own_http:
            await self._http.aclose()
            self._http = None

    # -------------------------------------------------------------------------- accounting
    def count_tokens(self, backend: Backend, text: str) -> int:
        """Tokens of ``text`` with the backend's tokenizer (``ModelSpec.tokenizer``)."""
        from router_ml.decision.costs import build_token_counter

        if not text:
            return 0
        return int(build_token_counter(backend.spec.tokenizer, backend.spec.kind).count([text])[0])

    def count_prompt(self, backend: Backend, body: Mapping[str, Any]) -> int:
        """Prompt tokens of a request ``body`` on ``backend``, chat template included
        (:func:`~router_ml.backends.prompt_tokens.count_prompt_tokens`)."""
        from router_ml.backends.prompt_tokens import count_prompt_tokens

        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        return count_prompt_tokens(
            backend,
            messages,
            lambda text: self.count_tokens(backend, text),
            continue_final_message=bool(body.get("continue_final_message")),
        )

    def cost(
        self,
        name: str,
        prompt_tokens: float,
        completion_tokens: float,
        cached_tokens: float = 0,
        cache_write_tokens: float = 0,
    ) -> float | None:
        """The bill of a call, USD; of its ``prompt_tokens``, ``cached_tokens`` were read from the
        provider's prompt cache and ``cache_write_tokens`` written to it, each at the catalog's
        price for them (``prices.cached_input_per_mtok`` / ``cache_write_per_mtok``; unset: the
        input price). None for a backend outside the cost model."""
        try:
            bill = self.cost_model.cost(name, prompt_tokens, completion_tokens)
        except UnknownModelError:
            return None
        if (cached_tokens or cache_write_tokens) and name in self.catalog:
            b = self.catalog.get(name)
            pin = self.cost_model.pool.input_price[self.cost_model.pool.index(name)]
            for tokens, price in (
                (cached_tokens, b.cached_input_per_mtok),
                (cache_write_tokens, b.cache_write_per_mtok),
            ):
                if tokens and price is not None:
                    bill += tokens * (price - pin) / 1e6
        return float(bill)

    def observe(self, name: str, ttft_s: float | None, tokens_per_s: float | None) -> None:
        """Feed a call's TTFT and decode speed to the latency model (if any)."""
        if self.latency_model is not None:
            with contextlib.suppress(UnknownModelError):
                self.latency_model.observe(name, ttft_s, tokens_per_s)

    def _expected_tps(self, backend: Backend) -> float | None:
        if self.latency_model is not None and backend.name in self.latency_model.pool:
            return float(self.latency_model.tokens_per_s[self.latency_model.pool.index(backend.name)])
        return backend.spec.tokens_per_s

    # -------------------------------------------------------------------------------- HTTP
    def _headers(self, backend: Backend) -> dict[str, str]:
        """The request headers by ``backend.api`` (its auth header), the catalog's extra ones after."""
        headers = {"Content-Type": "application/json"}
        key = backend.api_key()
        if backend.api == "anthropic":
            headers["anthropic-version"] = backend.api_version or ""
            if key:
                headers["x-api-key"] = key
        elif backend.api == "azure":
            if key:
                headers["api-key"] = key
        elif key:
            headers["Authorization"] = f"Bearer {key}"
        if backend.headers:
            try:
                extra = backend.extra_headers()
            except MissingSecret as err:
                raise BackendError(backend.name, str(err)) from None
            if any("\r" in v or "\n" in v for v in extra.values()):
                raise BackendError(backend.name, "an extra header's value holds a line break")
            headers.update(extra)
        return headers

    @staticmethod
    def _body(backend: Backend, payload: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        """The upstream request body in the backend's wire format (``api``)."""
        if backend.api == "anthropic":
            try:
                return anthropic.to_messages(
                    payload, backend.served_model_id, backend.spec.max_tokens, stream
                )
            except anthropic.TranslationError as err:
                raise BadRequest(
                    backend.name, f"cannot translate to the Messages API: {err}", status=400
                ) from None
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
            err = orjson.loads(text).get("error")
            text = str(err.get("message") if isinstance(err, dict) else err or text)
        except (ValueError, AttributeError):
            pass
        text = text.strip()[:300]
        for secret in backend.secrets():  # never let an upstream echo a key into our errors or logs
            text = text.replace(secret, "***")
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

    def first_token_deadline(self, backend: Backend, prefill_tokens: int = 0) -> float:
        """Seconds a stream may take to its first token: ``first_token_timeout_s`` plus the time to
        prefill ``prefill_tokens`` (a resumed stream's prompt and the answer so far) at the
        backend's ``prefill_tokens_per_s``, else at its expected decode speed (prefill is at least
        that fast, so the deadline is never cut short); at most ``timeout_s``."""
        rate = backend.prefill_tokens_per_s or self._expected_tps(backend)
        extra = prefill_tokens / rate if rate and prefill_tokens > 0 else 0.0
        return min(backend.timeout_s, backend.first_token_timeout_s + extra)

    def _route(self, backend: Backend) -> tuple[httpx.URL, bool]:
        got = self._routes.get(backend.name)
        if got is None:
            url = httpx.URL(backend.chat_url)
            fast = self.fast_http and url.scheme == "http" and not (self.trust_env and _proxied(url))
            got = self._routes[backend.name] = (url, fast)
        return got

    async def _request(self, backend: Backend, body: Mapping[str, Any], read_timeout: float | None) -> Any:
        """POST ``body``; the response once its headers arrived (an ``httpx.Response`` or a
        :class:`~router_ml.backends.http11.RawResponse`: both have ``status_code``, ``headers``,
        ``aread``, ``aiter_lines``, ``text`` and ``aclose``)."""
        url, fast = self._route(backend)
        data = orjson.dumps(body)
        if fast:
            if self._fast is None:
                if self.plain_http == "aiohttp":
                    from router_ml.backends.aio_http import AioHTTP

                    self._fast = AioHTTP(max_connections=self.max_connections)
                else:
                    self._fast = FastHTTP(max_connections=self.max_connections)
            return await self._fast.request(
                url,
                data,
                self._headers(backend),
                connect_timeout=backend.connect_timeout_s,
                read_timeout=read_timeout,
            )
        timeout = httpx.Timeout(backend.timeout_s, connect=backend.connect_timeout_s, read=read_timeout)
        request = self.http.build_request(
            "POST", url, content=data, headers=self._headers(backend), timeout=timeout
        )
        return await self.http.send(request, stream=True)

    async def _post(self, backend: Backend, body: dict[str, Any], state: _CallState) -> ChatResult:
        """One non-stream attempt: the whole answer within :meth:`_response_deadline`."""
        deadline = self._response_deadline(backend, body)

        async def answer() -> Any:
            resp = await self._request(backend, body, None if self._route(backend)[1] else deadline)
            try:
                await resp.aread()
            finally:
                await resp.aclose()
            return resp

        t = time.perf_counter()
        try:
            resp = await _within(answer(), deadline)
        except (TimeoutError, httpx.ReadTimeout):
            raise BackendTimeout(backend.name, f"no answer within {deadline:.2f} s", retryable=True) from None
        except httpx.HTTPError as err:
            raise transport_error(backend, err) from None
        end = time.perf_counter()
        if resp.status_code != 200:
            raise self._status_error(backend, resp)
        try:
            data = orjson.loads(resp.content)
            if backend.api == "anthropic":
                data = anthropic.to_chat_completion(data)
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            what = "a Messages API message" if backend.api == "anthropic" else "a chat.completion"
            raise BackendError(
                backend.name, f"answer is not {what} JSON", status=200, retryable=True
            ) from None
        text = _content_text(message.get("content"))
        usage = data.get("usage") or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        counted = not (isinstance(pt, int) and isinstance(ct, int))
        cached, written = (0, 0) if counted else cache_tokens(usage)
        if counted:
            pt = self.count_prompt(backend, body)
            ct = self.count_tokens(backend, text + tool_call_text(message.get("tool_calls")))
        if self.latency_model is not None and ct >= 8 and backend.name in self.latency_model.pool:
            ttft_est = float(self.latency_model.ttft[self.latency_model.pool.index(backend.name)])
            if end - t > 1.25 * ttft_est:
                self.observe(backend.name, None, ct / (end - t - ttft_est))
        return ChatResult(
            backend=backend.name,
            text=text,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=pt,
            completion_tokens=ct,
            ttft_s=None,
            latency_s=end - state.t0,
            tokens_per_s=ct / (end - t) if end > t else None,
            cost_usd=self.cost(backend.name, pt, ct, cached, written),
            attempts=state.attempts,
            raw=data,
            cached_tokens=cached,
            cache_write_tokens=written,
            usage_source="counted" if counted else "upstream",
            tried=state.tried,
            errors=state.errors,
        )

    async def _open(
        self, backend: Backend, body: dict[str, Any], deadline_s: float | None = None
    ) -> Upstream:
        """One stream attempt, returned once the first content arrived (or the stream ended)
        within ``deadline_s`` (default: the backend's ``first_token_timeout_s``)."""
        deadline_s = backend.first_token_timeout_s if deadline_s is None else deadline_s

        async def first_token() -> Upstream:
            resp = await self._request(backend, body, deadline_s)
            try:
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._status_error(backend, resp)
                up = Upstream(backend, body, resp, t)
                await up.prime()
                return up
            except BaseException:
                await resp.aclose()
                raise

        t = time.perf_counter()
        try:
            return await _within(first_token(), deadline_s)
        except TimeoutError:
            msg = f"no first token within {deadline_s:.3g} s"
            raise BackendTimeout(backend.name, msg, retryable=True) from None
        except httpx.HTTPError as err:
            raise transport_error(backend, err) from None
