"""FastHTTP (router_ml.backends.http11) over real sockets on 127.0.0.1.

Small asyncio servers written here send exact bytes (split where they like) and count the
connections they accept, hold open and see closed; the loopback server gives a realistic
OpenAI-compatible backend. Covers Content-Length, chunked and close-delimited bodies, SSE lines,
keep-alive reuse and ``Connection: close``, the retry of a reused connection the server dropped,
truncated and malformed responses, timeouts, releasing unread responses, ``max_connections``,
``aclose`` and BackendClient with and without ``fast_http``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

import httpx
import orjson
import pytest

from router_ml.backends.catalog import Catalog
from router_ml.backends.client import BackendClient
from router_ml.backends.http11 import FastHTTP, RawResponse
from tests.fakes.loopback import LoopbackThread, answer_text

PATH = "/v1/chat/completions"


def run(coro: Awaitable, timeout: float = 5.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def reply(body: bytes, status: str = "200 OK", headers: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    """A whole response with a Content-Length body."""
    head = b"%s %s\r\nContent-Length: %d\r\n%s\r\n" % (version, status.encode(), len(body), headers)
    return head + body


def chunked(*pieces: bytes) -> bytes:
    """``pieces`` as a chunked body, terminator included."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class Peer:
    """One accepted connection, as a handler sees it."""

    def __init__(self, server: RawServer, number: int, reader: asyncio.StreamReader, writer) -> None:
        self.server, self.number, self.reader, self.writer = server, number, reader, writer

    async def request(self) -> bytes | None:
        """The next request's body (recorded in ``server.requests``); None when the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.server.eofs += 1
            return None
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        self.server.requests.append((self.number, lines[0], headers, body))
        return body

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        """Write ``parts`` one by one (``pause`` after each, so that each is its own TCP segment)."""
        for part in parts:
            self.writer.write(part)
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def serve_echo(self, delay: float = 0.0) -> None:
        """Answer every request with its own body (after ``delay``) until the client closes."""
        while (body := await self.request()) is not None:
            if delay:
                await asyncio.sleep(delay)
            await self.send(reply(b"echo:" + body))


class RawServer:
    """An asyncio server on 127.0.0.1:0 running ``handler(peer)`` per connection; counts
    ``accepted``, currently ``open`` and at most open (``max_open``) connections and client EOFs."""

    def __init__(self, handler: Callable[[Peer], Awaitable[None]]) -> None:
        self.handler = handler
        self.accepted = self.open = self.max_open = self.eofs = 0
        self.requests: list[tuple[int, str, dict[str, str], bytes]] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = httpx.URL(f"http://127.0.0.1:{self.port}{PATH}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.handler(Peer(self, self.accepted, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            self._tasks.discard(task)
            writer.close()

    def bodies(self, number: int) -> list[bytes]:
        """The request bodies connection ``number`` received, in order."""
        return [body for n, _, _, body in self.requests if n == number]


async def echo(peer: Peer) -> None:
    await peer.serve_echo()


async def post(
    client: FastHTTP, url: httpx.URL, body: bytes = b"x", read_timeout: float | None = 2.0, **headers: str
) -> RawResponse:
    return await client.request(url, body, headers, connect_timeout=2.0, read_timeout=read_timeout)


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passed; its last value."""
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        await asyncio.sleep(0.005)
    return cond()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ bodies
def test_content_length_body_status_headers_and_the_request_sent():
    async def handler(peer: Peer) -> None:
        while (body := await peer.request()) is not None:
            answer = orjson.dumps({"got": body.decode(), "n": len(body)})
            await peer.send(
                reply(answer, "201 Created", b"X-Test: yes\r\nContent-Type: application/json\r\n")
            )

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            url = srv.url.copy_with(query=b"a=1")
            resp = await client.request(
                url, b'{"q": 1}', {"Authorization": "Bearer k"}, connect_timeout=2.0, read_timeout=2.0
            )
            status, headers = resp.status_code, dict(resp.headers)
            content = await resp.aread()
            await client.aclose()
            return srv.requests, status, headers, content, resp

    requests, status, headers, content, resp = run(main())
    assert status == 201 and headers["x-test"] == "yes" and headers["content-type"] == "application/json"
    assert content == resp.content == b'{"got":"{\\"q\\": 1}","n":8}'
    assert resp.json() == {"got": '{"q": 1}', "n": 8} and resp.text == content.decode()
    [(_, line, sent, body)] = requests
    assert line == f"POST {PATH}?a=1 HTTP/1.1" and body == b'{"q": 1}'
    assert sent["content-length"] == "8" and sent["authorization"] == "Bearer k"
    assert sent["host"].startswith("127.0.0.1:")


def test_chunked_body_split_at_awkward_places_and_the_connection_is_reused():
    wire = CHUNKED_HEAD + b"1a;ext=1\r\n" + b"A" * 26 + b"\r\n" + chunked(b"hello ", b"world")
    cuts = [5, 20, len(CHUNKED_HEAD) - 1, len(CHUNKED_HEAD) + 1, len(CHUNKED_HEAD) + 12]
    cuts += [len(CHUNKED_HEAD) + 36, len(CHUNKED_HEAD) + 37, len(wire) - 3, len(wire) - 1]
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    assert b"".join(pieces) == wire and len(pieces) == 10

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(*pieces, pause=0.003)

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            out = []
            for _ in range(2):
                resp = await post(client, srv.url)
                out.append((resp.status_code, resp.headers.get("transfer-encoding"), await resp.aread()))
            await client.aclose()
            return out, srv.accepted

    out, accepted = run(main())
    assert out == [(200, "chunked", b"A" * 26 + b"hello world")] * 2
    assert accepted == 1  # the end of a chunked body is recognised: the connection went back to the pool


SSE_PIECES = [
    b"data: a\n",
    b"\ndata: caf\xc3",  # a UTF-8 character split across chunks
    b"\xa9\r",  # "\r" and "\n" in different chunks
    b'\n\r\n: comment\r\ndata: {"x": ',
    b"1}\n\ndata: [DONE]\n\ndata: last",  # the final line has no newline
]
SSE_LINES = ["data: a", "", "data: café", "", ": comment", 'data: {"x": 1}', "", "data: [DONE]", ""]
SSE_LINES += ["data: last"]


def test_sse_lines_with_lf_and_crlf_ends_match_httpx():
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            body = chunked(*SSE_PIECES)
            await peer.send(CHUNKED_HEAD, body[:7], body[7:30], body[30:], pause=0.003)

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            resp = await post(client, srv.url)
            fast = [line async for line in resp.aiter_lines()]
            again = [line async for line in (await post(client, srv.url)).aiter_lines()]
            await client.aclose()
            async with (
                httpx.AsyncClient(trust_env=False) as ref,
                ref.stream("POST", srv.url, content=b"x") as r,
            ):
                slow = [line async for line in r.aiter_lines()]
            return fast, again, slow, srv.accepted

    fast, again, slow, accepted = run(main())
    assert fast == again == SSE_LINES
    assert slow == SSE_LINES  # the same lines as httpx gives callers
    assert accepted == 2  # FastHTTP's two streams on one connection, httpx's on another


@pytest.mark.parametrize("read", ["aread", "aiter_lines"])
def test_a_body_delimited_by_the_connection_close_reads_complete(read):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"line 1\nli", b"ne 2\n", pause=0.003
        )
        # the handler returns: the server closes the connection, which ends the body

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP(max_connections=1)
            resp = await post(client, srv.url)
            got = await resp.aread() if read == "aread" else [line async for line in resp.aiter_lines()]
            follow = await post(client, srv.url)  # a new connection (this one ended); the slot was freed
            await follow.aclose()
            await client.aclose()
            return got, srv.accepted

    got, accepted = run(main())
    assert got == (b"line 1\nline 2\n" if read == "aread" else ["line 1", "line 2"])
    assert accepted == 2


# -------------------------------------------------------------------------------- keep-alive
def test_sequential_requests_share_one_connection():
    async def main():
        async with RawServer(echo) as srv:
            client = FastHTTP()
            answers = []
            for body in (b"one", b"two", b"three"):
                resp = await post(client, srv.url, body)
                answers.append(await resp.aread())
            await client.aclose()
            return answers, srv.accepted, srv.bodies(1)

    answers, accepted, on_first = run(main())
    assert answers == [b"echo:one", b"echo:two", b"echo:three"]
    assert accepted == 1 and on_first == [b"one", b"two", b"three"]


@pytest.mark.parametrize(
    "head",
    [
        pytest.param((b"HTTP/1.1", b"Connection: close\r\n"), id="connection-close"),
        pytest.param((b"HTTP/1.0", b""), id="http-1.0"),
    ],
)
def test_a_response_that_ends_keep_alive_is_not_reused(head):
    version, extra = head

    async def handler(peer: Peer) -> None:
        # keeps serving on the connection: only the client's choice makes it open a new one
        while (body := await peer.request()) is not None:
            await peer.send(reply(b"echo:" + body, headers=extra, version=version))

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            answers = [await (await post(client, srv.url, b)).aread() for b in (b"one", b"two")]
            seen_eof = await until(lambda: srv.eofs >= 1)
            await client.aclose()
            return answers, srv.accepted, seen_eof

    answers, accepted, seen_eof = run(main())
    assert answers == [b"echo:one", b"echo:two"]
    assert accepted == 2 and seen_eof  # the first connection was closed by the client, not reused


def test_an_idle_connection_past_keepalive_expiry_is_replaced():
    async def main():
        async with RawServer(echo) as srv:
            client = FastHTTP(keepalive_expiry=0.05)
            first = await (await post(client, srv.url, b"a")).aread()
            await asyncio.sleep(0.1)
            second = await (await post(client, srv.url, b"b")).aread()
            closed_old = await until(lambda: srv.eofs >= 1)
            await client.aclose()
            return first, second, srv.accepted, closed_old

    first, second, accepted, closed_old = run(main())
    assert (first, second) == (b"echo:a", b"echo:b") and accepted == 2 and closed_old


# ------------------------------------------------------------------ connections the server drops
def test_an_idle_connection_the_server_closed_is_replaced():
    async def handler(peer: Peer) -> None:
        body = await peer.request()
        await peer.send(reply(b"echo:" + body))  # keep-alive announced, then closed at once

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            first = await (await post(client, srv.url, b"a")).aread()
            await until(lambda: srv.open == 0)
            await asyncio.sleep(0.01)
            second = await (await post(client, srv.url, b"b")).aread()
            await client.aclose()
            return first, second, srv.accepted

    first, second, accepted = run(main())
    assert (first, second) == (b"echo:a", b"echo:b") and accepted == 2


def test_a_reused_connection_dropped_on_the_next_request_is_retried_once_on_a_new_one():
    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            body = await peer.request()
            await peer.send(reply(b"echo:" + body))
            await peer.request()  # the second request arrives on the pooled connection: dropped unanswered
            return
        await peer.serve_echo()

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP(max_connections=1)
            first = await (await post(client, srv.url, b"a")).aread()
            second = await (await post(client, srv.url, b"b")).aread()
            third = await (await post(client, srv.url, b"c")).aread()
            await client.aclose()
            return [first, second, third], srv.accepted, srv.bodies(1), srv.bodies(2)

    answers, accepted, on_first, on_second = run(main())
    assert answers == [b"echo:a", b"echo:b", b"echo:c"]
    assert accepted == 2 and on_first == [b"a", b"b"] and on_second == [b"b", b"c"]


@pytest.mark.parametrize("when", ["after-reading", "at-once"])
def test_a_fresh_connection_closed_before_any_response_raises(when):
    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            if when == "after-reading":
                await peer.request()
            return
        await peer.serve_echo()

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP(max_connections=1)
            with pytest.raises(httpx.RemoteProtocolError):
                await post(client, srv.url, b"a")
            accepted = srv.accepted  # a fresh connection is not retried: the server may have acted on it
            after = await (await post(client, srv.url, b"b")).aread()  # and its slot was given back
            await client.aclose()
            return accepted, after

    accepted, after = run(main())
    assert accepted == 1 and after == b"echo:b"


def test_a_reused_connection_closed_mid_response_is_not_retried():
    async def handler(peer: Peer) -> None:
        body = await peer.request()
        await peer.send(reply(b"echo:" + body))
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")  # part of an answer: the request was seen

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            await (await post(client, srv.url, b"a")).aread()
            with pytest.raises(httpx.RemoteProtocolError):
                await post(client, srv.url, b"b")
            await client.aclose()
            return srv.accepted

    assert run(main()) == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("read", ["aread", "aiter_lines"])
def test_a_body_cut_short_raises(framing, read):
    if framing == "content-length":
        wire = [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"line 1\nline 2"]
    else:
        wire = [CHUNKED_HEAD, b"7\r\nline 1\n\r\n", b"6\r\nline 2\r\n"]

    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            await peer.request()
            await peer.send(*wire, pause=0.003)
            return  # closed with the body incomplete
        await peer.serve_echo()

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP(max_connections=1)
            resp = await post(client, srv.url)
            lines = []
            with pytest.raises(httpx.RemoteProtocolError, match="peer closed connection"):
                if read == "aread":
                    await resp.aread()
                else:
                    async for line in resp.aiter_lines():
                        lines.append(line)
            await resp.aclose()
            after = await (await post(client, srv.url, b"b")).aread()
            await client.aclose()
            return lines, after, srv.accepted

    lines, after, accepted = run(main())
    assert lines == ([] if read == "aread" else ["line 1"])  # no partial last line passed off as whole
    assert after == b"echo:b" and accepted == 2


# ------------------------------------------------------------------------ errors and timeouts
@pytest.mark.parametrize(
    "wire", [b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", b"HELLO THERE\r\n\r\n", b"\x00\x01garbage\r\n"]
)
def test_a_malformed_status_line_raises_remote_protocol_error(wire):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(wire)
        await peer.request()  # stays open: the client must give up on its own

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            with pytest.raises(httpx.RemoteProtocolError, match="malformed HTTP response"):
                await post(client, srv.url)
            closed = await until(lambda: srv.eofs == 1)
            await client.aclose()
            return closed

    assert run(main())


def test_connecting_to_a_closed_port_raises_connect_error():
    async def main():
        client = FastHTTP()
        with pytest.raises(httpx.ConnectError):
            await post(client, httpx.URL(f"http://127.0.0.1:{_free_port()}{PATH}"))
        await client.aclose()

    run(main())


def test_a_server_that_never_answers_raises_read_timeout():
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.request()  # silent until the client closes

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            with pytest.raises(httpx.ReadTimeout):  # run()'s 5 s guard fails a read that never times out
                await post(client, srv.url, read_timeout=0.2)
            dropped = await until(lambda: srv.open == 0)  # the timed-out connection is closed
            await client.aclose()
            return dropped

    assert run(main())


def test_a_listener_that_never_accepts_raises_connect_timeout():
    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once the backlog is full, Linux drops further SYNs
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for s in fillers:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
        client = FastHTTP()
        try:  # run()'s 5 s guard fails a connect that never times out
            await client.request(
                httpx.URL(f"http://127.0.0.1:{port}{PATH}"), b"x", {}, connect_timeout=0.2, read_timeout=1.0
            )
        except httpx.ConnectTimeout as e:
            return e
        except httpx.ConnectError:
            pytest.skip("this kernel refuses connections past a full backlog instead of dropping them")
        finally:
            await client.aclose()
            for s in [*fillers, listener]:
                s.close()
        raise AssertionError("connected to a listener that never accepts")

    assert isinstance(run(main()), httpx.ConnectTimeout)


@pytest.mark.parametrize("read", ["aread", "aiter_lines"])
def test_a_body_that_stalls_raises_read_timeout(read):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD, chunked(b"data: 1\n\n")[:-5])  # one chunk, then silence
        await peer.request()  # until the client closes

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            resp = await post(client, srv.url, read_timeout=0.2)
            lines = []
            with pytest.raises(httpx.ReadTimeout):
                if read == "aread":
                    await resp.aread()
                else:
                    async for line in resp.aiter_lines():
                        lines.append(line)
            await resp.aclose()
            dropped = await until(lambda: srv.eofs == 1)
            await client.aclose()
            return lines, dropped

    lines, dropped = run(main())
    assert lines == ([] if read == "aread" else ["data: 1", ""]) and dropped


# --------------------------------------------------------------------- releasing and the pool
def test_releasing_an_unread_response_drops_an_unfinished_connection():
    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 10)
        await peer.serve_echo()  # would answer on this connection if the client reused it

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP(max_connections=1)
            resp = await post(client, srv.url, b"a")
            await resp.aclose()
            after = await (await post(client, srv.url, b"b")).aread()
            dropped = await until(lambda: srv.eofs >= 1)
            await client.aclose()
            return after, srv.accepted, srv.bodies(1), dropped

    after, accepted, on_first, dropped = run(main())
    assert after == b"echo:b" and accepted == 2 and on_first == [b"a"] and dropped


def test_releasing_a_complete_but_unread_response_reuses_a_clean_connection():
    async def main():
        async with RawServer(echo) as srv:
            client = FastHTTP(max_connections=1)
            resp = await post(client, srv.url, b"a" * 1000)
            await asyncio.sleep(0.02)
            await resp.aclose()  # its body arrived but was never read
            after = await (await post(client, srv.url, b"b")).aread()
            await client.aclose()
            return after, srv.accepted

    after, accepted = run(main())
    assert after == b"echo:b"  # not the leftovers of the first answer
    assert accepted == 1


def test_abandoning_a_stream_midway_drops_its_connection():
    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            await peer.request()
            await peer.send(CHUNKED_HEAD, chunked(b"data: 1\n\n", b"data: 2\n\n")[:-5])  # not finished
        await peer.serve_echo()

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP(max_connections=1)
            resp = await post(client, srv.url, b"a")
            lines = resp.aiter_lines()
            first = await lines.__anext__()
            await lines.aclose()
            await resp.aclose()
            after = await (await post(client, srv.url, b"b")).aread()
            await client.aclose()
            return first, after, srv.accepted, srv.bodies(1)

    first, after, accepted, on_first = run(main())
    assert first == "data: 1" and after == b"echo:b" and accepted == 2 and on_first == [b"a"]


@pytest.mark.parametrize("where", ["headers", "body"])
def test_cancelling_a_request_frees_its_slot_and_drops_its_connection(where):
    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            await peer.request()
            if where == "body":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nab")
        await peer.serve_echo()  # silent on the first request; would answer a reused connection's next

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP(max_connections=1)

            async def first() -> bytes:  # as BackendClient's non-stream call: no read timeout, a deadline
                resp = await post(client, srv.url, b"a", read_timeout=None)
                try:
                    return await resp.aread()
                finally:
                    await resp.aclose()

            with pytest.raises(TimeoutError):
                await asyncio.wait_for(first(), 0.1)
            after = await (await post(client, srv.url, b"b")).aread()
            dropped = await until(lambda: srv.eofs >= 1)
            await client.aclose()
            return after, srv.accepted, dropped

    after, accepted, dropped = run(main())
    assert after == b"echo:b" and accepted == 2 and dropped


def test_large_bodies_both_ways():
    payload = bytes(range(256)) * 8192  # 2 MiB: many reads and writes on each side

    async def main():
        async with RawServer(echo) as srv:
            client = FastHTTP()
            got = [await (await post(client, srv.url, payload)).aread() for _ in range(2)]
            await client.aclose()
            return got, srv.accepted

    got, accepted = run(main())
    assert got == [b"echo:" + payload] * 2 and accepted == 1


def test_max_connections_caps_open_connections_and_all_requests_succeed():
    async def handler(peer: Peer) -> None:
        await peer.serve_echo(delay=0.05)

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP(max_connections=2)

            async def one(i: int) -> bytes:
                return await (await post(client, srv.url, b"%d" % i)).aread()

            answers = await asyncio.gather(*(one(i) for i in range(5)))
            await client.aclose()
            return answers, srv.max_open, srv.accepted

    answers, max_open, accepted = run(main())
    assert answers == [b"echo:%d" % i for i in range(5)]
    assert max_open == 2 and accepted == 2


def test_aclose_closes_idle_and_busy_connections():
    async def handler(peer: Peer) -> None:
        while (body := await peer.request()) is not None:
            if body == b"hold":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
            else:
                await asyncio.sleep(0.03)
                await peer.send(reply(body))

    async def main():
        async with RawServer(handler) as srv:
            client = FastHTTP()
            resps = await asyncio.gather(*(post(client, srv.url, b) for b in (b"1", b"2", b"3", b"hold")))
            answers = [await r.aread() for r in resps[:3]]  # three idle connections, one busy
            open_before = srv.open
            await client.aclose()
            all_closed = await until(lambda: srv.eofs == 4 and srv.open == 0)
            with pytest.raises(httpx.RemoteProtocolError):
                await resps[3].aread()
            return answers, open_before, all_closed

    answers, open_before, all_closed = run(main())
    assert answers == [b"1", b"2", b"3"] and open_before == 4 and all_closed


# ------------------------------------------------------------------- an OpenAI-compatible server
MESSAGES = [{"role": "user", "content": "What is the capital of France and why is it famous?"}]


def test_chat_and_stream_against_the_loopback_server_on_one_connection():
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 64}

    async def main(srv: LoopbackThread):
        client = FastHTTP()
        url = httpx.URL(srv.base_url + "/chat/completions")
        resp = await post(client, url, orjson.dumps(body), **{"Content-Type": "application/json"})
        await resp.aread()
        data, status, ctype = resp.json(), resp.status_code, resp.headers["content-type"]
        resp = await post(client, url, orjson.dumps({**body, "stream": True}))
        lines = [line async for line in resp.aiter_lines()]
        again = await (await post(client, url, orjson.dumps(body))).aread()
        await client.aclose()
        return data, status, ctype, lines, again

    with LoopbackThread() as srv:
        data, status, ctype, lines, again = run(main(srv))
        connections = srv.server.stats["connections"]
    expected = answer_text(MESSAGES)
    assert status == 200 and ctype.startswith("application/json")
    assert (
        data["choices"][0]["message"]["content"] == expected
        and orjson.loads(again)["choices"] == data["choices"]
    )
    events = [line[5:].strip() for line in lines if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == expected
    assert connections == 1


def test_backend_client_gives_the_same_answers_with_and_without_fast_http():
    async def main(port: int, fast: bool):
        catalog = Catalog.from_entries(
            [
                {
                    "name": "b0",
                    "kind": "vllm",
                    "base_url": f"http://127.0.0.1:{port}/v1",
                    "served_model_id": "served-0",
                    "tokenizer": "approx",
                    "prices": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
                }
            ],
            source="test",
        )
        async with BackendClient(catalog, fast_http=fast, trust_env=False) as client:
            res = await client.chat("b0", {"messages": MESSAGES, "max_tokens": 64})
            stream = await client.stream("b0", {"messages": MESSAGES, "max_tokens": 64})
            chunks = [c async for c in stream]
            again = await client.chat("b0", {"messages": MESSAGES, "max_tokens": 64})
            assert again.text == res.text
            used_fast = client._fast is not None
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        return res.text, res.finish_reason, text, stream.result.text, used_fast

    with LoopbackThread() as srv:
        fast = run(main(srv.port, True))
        fast_connections = srv.server.stats["connections"]
        slow = run(main(srv.port, False))
    assert fast[-1] is True and slow[-1] is False  # the two paths were really taken
    assert fast_connections == 1  # chat, stream (drained after [DONE]) and chat on one connection
    assert fast[:-1] == slow[:-1]
    expected = answer_text(MESSAGES)
    assert fast[0] == fast[2] == fast[3] == expected and fast[1] == "stop"
