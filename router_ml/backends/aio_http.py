"""aiohttp's client for plain ``http://`` backends: the maintained client FastHTTP is measured against.

Used only when asked for (``HttpCalls(plain_http="aiohttp")`` or ``ROUTER_ML_HTTP_CLIENT=aiohttp``,
``experiments/bench_proxy.py --backend-client``); aiohttp is a dev / bench dependency.
:class:`AioHTTP` posts with one ``aiohttp.ClientSession``; :class:`AioResponse` exposes
``status_code``, ``headers``, ``aread`` / ``content`` / ``text`` / ``json()``, ``aiter_lines`` and
``aclose``. aiohttp's errors are raised as the ``httpx`` exception classes the callers handle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx
import orjson


def _as_httpx(err: BaseException) -> BaseException:
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(err) or "connect timeout")
    if isinstance(err, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return httpx.ReadTimeout(str(err) or "read timeout")
    if isinstance(err, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(err))
    if isinstance(err, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        return httpx.RemoteProtocolError(
            f"peer closed connection without sending complete message body: {err}"
        )
    if isinstance(err, aiohttp.ClientError):
        return httpx.ReadError(str(err) or type(err).__name__)
    return err


class AioResponse:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status_code, self.headers = resp.status, resp.headers
        self.content = b""

    async def aread(self) -> bytes:
        try:
            self.content = await self._resp.read()
        except aiohttp.ClientError as e:
            raise _as_httpx(e) from None
        except TimeoutError as e:
            raise _as_httpx(e) from None
        finally:
            self._resp.release()
        return self.content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.content)

    async def aiter_lines(self) -> AsyncIterator[str]:
        reader = self._resp.content
        try:
            while line := await reader.readline():
                yield line.rstrip(b"\r\n").decode("utf-8", "replace")
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _as_httpx(e) from None

    async def aclose(self) -> None:
        self._resp.release()


class AioHTTP:
    def __init__(self, max_connections: int = 256, keepalive_expiry: float = 30.0) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, Any] = {}  # httpx URL text -> yarl.URL, parsed once
        self.max_connections, self.keepalive_expiry = max_connections, keepalive_expiry

    async def request(
        self, url: httpx.URL, body: bytes, headers: Mapping[str, str], *, connect_timeout: float,
        read_timeout: float | None,
    ) -> AioResponse:  # fmt: skip
        if self._session is None:
            conn = aiohttp.TCPConnector(limit_per_host=self.max_connections, limit=0,
                                        keepalive_timeout=self.keepalive_expiry)  # fmt: skip
            self._session = aiohttp.ClientSession(connector=conn, trust_env=False,
                                                  auto_decompress=False, skip_auto_headers=("User-Agent",))  # fmt: skip
        key = str(url)
        target = self._urls.get(key)
        if target is None:
            import yarl

            target = self._urls[key] = yarl.URL(key)
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        try:
            resp = await self._session.post(target, data=body, headers=headers, timeout=timeout)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _as_httpx(e) from None
        return AioResponse(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
