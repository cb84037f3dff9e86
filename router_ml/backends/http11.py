"""A minimal asyncio HTTP/1.1 keep-alive client for plain-``http://`` backends (the proxy's hot path).

``httpx`` costs about 0.7 ms of CPU per request (httpcore + anyio + h11 in pure Python, headers and
body in two socket writes); this client costs about 0.1 ms: one ``transport.write`` per request,
responses parsed by ``httptools`` (C), idle connections kept per ``host:port``. It speaks only
what OpenAI-compatible servers answer with (Content-Length or chunked bodies, SSE streams) and no
TLS or proxies: :class:`~router_ml.backends.client.BackendClient` uses ``httpx`` for ``https://``
backends and for hosts an ``HTTP_PROXY`` applies to.

Buffering is bounded: a streamed body is read from the socket only while less than
``HIGH_WATER`` bytes wait for the reader (``transport.pause_reading`` above it, resumed below
``LOW_WATER``), one line may not exceed ``MAX_LINE`` bytes, and a whole body read with ``aread``
not ``max_body_bytes``. A header sent several times is kept as one value, the values joined by
``", "`` in order (RFC 9110 5.3; ``Set-Cookie`` lines are never combined by a backend's answer).

Failures raise ``httpx``'s exception classes (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
``ReadError``, ``RemoteProtocolError``), so callers handle both clients the same way.

Kept by measurement (issue 13, ``python -m experiments.bench_proxy --backend-client fast httpx
aiohttp --rounds 4``): the proxy passes through more requests per second with it than with either
maintained client; the README gives the figures. ``tests/test_http11_fuzz.py`` fuzzes it with
hypothesis against real sockets and against ``httpx`` on the same bytes.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httptools
import httpx
import orjson

#: Bytes of a streamed body waiting for the reader above which the socket is no longer read.
HIGH_WATER = 256 * 1024
#: ... and below which it is read again.
LOW_WATER = 64 * 1024
#: The longest line :meth:`RawResponse.aiter_lines` accepts (an SSE event line).
MAX_LINE = 1 << 20
#: The largest body :meth:`RawResponse.aread` reads (a chat completion is far smaller).
MAX_BODY = 64 << 20


class _Conn(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future | None = None
        self.begin()

    def begin(self) -> None:
        if getattr(self, "paused", False):
            self.resume()
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0  # bytes in ``body``
        self.max_buffered: int | None = HIGH_WATER  # None: read on (``aread`` bounds the total)
        self.paused = False
        self.headers_done = self.complete = self.received = self.keep_alive = False
        self.error: Exception | None = None

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = httpx.RemoteProtocolError(f"malformed HTTP response: {e}")
            self.close()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            framed = "content-length" in self.headers or "chunked" in self.headers.get(
                "transfer-encoding", ""
            )
            if self.headers_done and not framed:  # a body delimited by the end of the connection
                self.complete = True
            elif not self.received:
                self.error = httpx.RemoteProtocolError("server disconnected without sending a response")
            else:  # the words httpcore uses, so that both clients' errors read alike
                what = "incomplete chunked read" if framed and "content-length" not in self.headers else exc
                self.error = httpx.RemoteProtocolError(
                    f"peer closed connection without sending complete message body: {what or 'closed'}"
                )
        self._wake()

    # ---- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        seen = self.headers.get(key)
        self.headers[key] = text if seen is None else f"{seen}, {text}"  # a repeated header: one list

    def on_headers_complete(self) -> None:
        self.status, self.headers_done = self.parser.get_status_code(), True
        self.keep_alive = self.parser.should_keep_alive()  # only valid before the message completes

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        limit = self.max_buffered
        if limit is not None and self.buffered > limit and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()  # backpressure: the server's writes wait for our reader

    def take(self) -> bytes:
        """The oldest buffered piece of the body; reading resumes once the buffer ran low."""
        piece = self.body.popleft()
        self.buffered -= len(piece)
        if self.paused and self.buffered <= LOW_WATER:
            self.resume()
        return piece

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # ---- waiting
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until more of the response arrived (or it failed): ``httpx.ReadTimeout`` after ``timeout``."""
        if self.error is not None:
            raise self.error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            if timeout is None:
                await self._waiter
            else:
                async with asyncio.timeout(timeout):
                    await self._waiter
        except TimeoutError:
            raise httpx.ReadTimeout(f"no data for {timeout:g} s") from None
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self.error is None
            and self.keep_alive
            and "close" not in self.headers.get("connection", "").lower().replace(" ", "").split(",")
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RawResponse:
    """A response whose headers arrived; the body is read with :meth:`aread` or :meth:`aiter_lines`.

    Mirrors the part of ``httpx.Response`` the backend client uses (``status_code``, ``headers``,
    ``content`` / ``text`` / ``json()`` after :meth:`aread`, ``aclose``)."""

    def __init__(self, client: FastHTTP, conn: _Conn, read_timeout: float | None) -> None:
        self._client, self._conn, self.read_timeout = client, conn, read_timeout
        self.status_code, self.headers = conn.status, conn.headers
        self.content = b""
        self._closed = False

    async def aread(self, max_bytes: int = MAX_BODY) -> bytes:
        """The whole body; ``httpx.RemoteProtocolError`` past ``max_bytes``."""
        conn = self._conn
        conn.max_buffered = None
        conn.resume()
        try:
            while not conn.complete:
                if conn.buffered > max_bytes:
                    raise httpx.RemoteProtocolError(f"response body is over {max_bytes} bytes")
                await conn.wait(self.read_timeout)
            if conn.buffered > max_bytes:
                raise httpx.RemoteProtocolError(f"response body is over {max_bytes} bytes")
        except BaseException:
            await self.aclose()  # frees the slot; an unfinished connection is dropped, not pooled
            raise
        self.content = b"".join(conn.body)
        conn.body.clear()
        conn.buffered = 0
        await self.aclose()
        return self.content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.content)

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines (``\\n`` or ``\\r\\n`` ends), as they arrive."""
        conn, buf = self._conn, b""
        while True:
            while conn.body:
                buf += conn.take()
                if b"\n" in buf:
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        yield line.rstrip(b"\r").decode("utf-8", "replace")
                if len(buf) > MAX_LINE:
                    await self.aclose()
                    raise httpx.RemoteProtocolError(f"a line of the response is over {MAX_LINE} bytes")
            if conn.complete:
                break
            try:
                await conn.wait(self.read_timeout)
            except BaseException:
                await self.aclose()
                raise
        if buf:
            yield buf.rstrip(b"\r").decode("utf-8", "replace")
        await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._client._release(self._conn)


class FastHTTP:
    """Keep-alive HTTP/1.1 connections per ``host:port`` (at most ``max_connections`` each, idle ones
    dropped after ``keepalive_expiry`` seconds)."""

    def __init__(self, max_connections: int = 256, keepalive_expiry: float = 30.0) -> None:
        self.max_connections, self.keepalive_expiry = max_connections, keepalive_expiry
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._open: set[_Conn] = set()

    async def request(
        self,
        url: httpx.URL,
        body: bytes,
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        read_timeout: float | None,
    ) -> RawResponse:
        """POST ``body`` to ``url``; returns once the response headers arrived (before
        ``read_timeout`` between reads). A reused connection the server had closed is retried once
        on a new one (nothing was received, so nothing was processed)."""
        key = (url.host, url.port or 80)
        target = url.raw_path.decode("ascii")
        host = f"[{key[0]}]" if ":" in key[0] else key[0]  # an IPv6 literal is bracketed
        head = [f"POST {target} HTTP/1.1\r\nHost: {host}:{key[1]}\r\nContent-Length: {len(body)}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers.items()]
        data = "".join(head).encode("latin-1") + b"\r\n" + body
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(self.max_connections)
        await slots.acquire()
        try:
            for _ in range(2):
                conn, reused = await self._connection(key, connect_timeout)
                conn.transport.write(data)
                try:
                    while not conn.headers_done:
                        await conn.wait(read_timeout)
                except BaseException as e:
                    self._discard(conn)
                    if isinstance(e, httpx.RemoteProtocolError) and reused and not conn.received:
                        continue
                    raise
                return RawResponse(self, conn, read_timeout)
            raise httpx.RemoteProtocolError("server disconnected without sending a response")
        except BaseException:
            slots.release()
            raise

    async def _connection(self, key: tuple[str, int], connect_timeout: float) -> tuple[_Conn, bool]:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                conn.begin()
                return conn, True
            self._discard(conn)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(lambda: _Conn(key), key[0], key[1])
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"no connection to {key[0]}:{key[1]} within {connect_timeout:g} s"
            ) from None
        except OSError as e:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {e}") from None
        self._open.add(conn)
        return conn, False

    def _release(self, conn: _Conn) -> None:
        """A response is finished with: keep its connection if the whole body was read, else close it."""
        self._slots[conn.key].release()
        if conn.reusable():
            conn.idle_since = time.monotonic()
            conn.body.clear()
            conn.buffered = 0
            self._idle.setdefault(conn.key, []).append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: _Conn) -> None:
        conn.close()
        self._open.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
