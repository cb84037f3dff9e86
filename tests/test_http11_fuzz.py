"""FastHTTP (router_ml.backends.http11) fuzzed with hypothesis against real sockets, with httpx as
the reference parser.

Hypothesis writes HTTP/1.1 responses (status, repeated and mixed-case headers, Content-Length,
chunked or close-delimited bodies, SSE text, several responses on one keep-alive connection) and
cuts them into TCP writes at arbitrary points; an asyncio server on 127.0.0.1 sends them. FastHTTP
must read back exactly what was sent, and the same as httpx reads from the same bytes. Mutated
responses (truncated, bytes overwritten) must end in a response or an ``httpx.HTTPError`` within
the read timeout: never a hang, never another exception. Bounded buffering: a fast server
streaming to a slow reader leaves at most about ``HIGH_WATER`` bytes in the client's buffer.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from router_ml.backends.http11 import HIGH_WATER, FastHTTP  # noqa: E402

PATH = "/v1/chat/completions"
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

header_names = st.sampled_from(
    ["X-Trace", "x-trace", "Retry-After", "X-Router-Note", "Cache-Control", "Vary"]
)
header_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20).map(
    str.strip
)
bodies = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60), max_size=30).map(
        lambda lines: "".join(f"data: {x}\n\n" for x in lines).encode()
    ),
)


@st.composite
def responses(draw, keep_alive: bool = True) -> tuple[bytes, int, dict[str, str], bytes]:
    """``(wire bytes, status, expected headers, body)`` of one response."""
    status = draw(st.sampled_from([200, 201, 400, 404, 429, 500, 503]))
    body = draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked"] + ([] if keep_alive else ["close"])))
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    head = [f"HTTP/1.1 {status} Whatever"]
    head += [f"{k}: {v}" for k, v in headers]
    if framing == "length":
        head.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 700), max_size=12))
        pieces, at = [], 0
        for size in sizes:
            if at < len(body):
                pieces.append(body[at : at + size])
                at += size
        if at < len(body):
            pieces.append(body[at:])
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        head.append("Connection: close")
        payload = body
    expected: dict[str, str] = {}
    for k, v in headers:
        expected[k.lower()] = v if k.lower() not in expected else f"{expected[k.lower()]}, {v}"
    wire = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
    return wire, status, expected, body


_shared: dict[str, object] = {}


def arun(coro, timeout: float):
    """Run ``coro`` on one event loop kept for the module (an httpx client is slow to start: ~0.25 s)."""
    if "loop" not in _shared:
        _shared["loop"] = asyncio.new_event_loop()
    return _shared["loop"].run_until_complete(asyncio.wait_for(coro, timeout))


def reference() -> httpx.AsyncClient:
    """The module's httpx client (made inside the module's loop)."""
    if "httpx" not in _shared:
        _shared["httpx"] = httpx.AsyncClient(timeout=1.0, trust_env=False)
    return _shared["httpx"]


@pytest.fixture(scope="module", autouse=True)
def _close_shared():
    yield
    if "httpx" in _shared:
        arun(_shared.pop("httpx").aclose(), 5)
    if "loop" in _shared:
        _shared.pop("loop").close()


def cuts(data: st.DataObject, wire: bytes) -> list[bytes]:
    points = sorted(data.draw(st.sets(st.integers(1, max(1, len(wire) - 1)), max_size=6)))
    return [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True) if a < b]


class Scripted:
    """A server on 127.0.0.1 answering the n-th request of its (one) connection with ``parts[n]``
    (each a list of writes), closing the connection after the last or when ``close_after``."""

    def __init__(self, parts: list[list[bytes]], close_after: bool = False) -> None:
        self.parts, self.close_after = parts, close_after

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = httpx.URL(f"http://127.0.0.1:{port}{PATH}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for writes in self.parts:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                for w in writes:
                    writer.write(w)
                    await writer.drain()
                    await asyncio.sleep(0)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _fast_read(client: FastHTTP, url: httpx.URL, stream: bool) -> tuple[int, dict[str, str], bytes]:
    r = await client.request(url, b"{}", {}, connect_timeout=2.0, read_timeout=1.0)
    if stream:
        lines = [line async for line in r.aiter_lines()]
        return r.status_code, dict(r.headers), "\n".join(lines).encode()
    return r.status_code, dict(r.headers), await r.aread()


def _lines(body: bytes) -> bytes:
    """What ``aiter_lines`` gives back for ``body`` (its lines joined by ``\\n``)."""
    lines = body.split(b"\n")
    if body.endswith(b"\n"):
        lines.pop()
    return "\n".join(x.rstrip(b"\r").decode("utf-8", "replace") for x in lines).encode()


@FUZZ
@given(st.lists(responses(), min_size=1, max_size=3), st.data(), st.booleans())
def test_valid_responses_read_back_exactly_and_as_httpx_reads_them(answers, data, stream):
    parts = [cuts(data, wire) for wire, *_ in answers]

    async def main() -> None:
        async with Scripted(parts) as srv:
            client = FastHTTP()
            try:
                for _, status, headers, body in answers:  # one keep-alive connection
                    got_status, got_headers, got_body = await _fast_read(client, srv.url, stream)
                    assert got_status == status
                    for k, v in headers.items():
                        assert got_headers[k] == v
                    if stream:
                        assert got_body == _lines(body)
                    else:
                        assert got_body == body
            finally:
                await client.aclose()
        ref = reference()
        async with Scripted(parts) as srv:
            for _, status, headers, body in answers:
                r = await ref.post(str(srv.url), content=b"{}")
                assert r.status_code == status and r.content == body
                assert all(r.headers[k] == v for k, v in headers.items())

    arun(main(), 20)


@FUZZ
@given(responses(keep_alive=False), st.data(), st.booleans())
def test_close_delimited_bodies(answer, data, stream):
    wire, status, _, body = answer

    async def main() -> None:
        async with Scripted([cuts(data, wire)], close_after=True) as srv:
            client = FastHTTP()
            try:
                got_status, _, got_body = await _fast_read(client, srv.url, stream)
            finally:
                await client.aclose()
            assert got_status == status
            if not stream:
                assert got_body == body

    arun(main(), 20)


@FUZZ
@given(responses(), st.data(), st.booleans())
def test_mutated_responses_end_in_an_answer_or_an_httpx_error(answer, data, stream):
    wire = bytearray(answer[0])
    how = data.draw(st.sampled_from(["truncate", "overwrite", "both"]))
    if how in ("truncate", "both"):
        del wire[data.draw(st.integers(0, len(wire) - 1)) :]
    if how in ("overwrite", "both") and wire:
        for _ in range(data.draw(st.integers(1, 4))):
            wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    parts = [cuts(data, bytes(wire))] if wire else [[]]

    async def main() -> None:
        async with Scripted(parts, close_after=True) as srv:
            client = FastHTTP()
            try:
                with contextlib.suppress(httpx.HTTPError):
                    await _fast_read(client, srv.url, stream)
            finally:
                await client.aclose()

    arun(main(), 10)  # a hang fails here, any other exception too


def test_a_slow_reader_bounds_the_buffer_of_a_fast_stream():
    total = 16 * HIGH_WATER
    line = b"data: " + b"x" * 1000 + b"\n"

    async def main() -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (total // len(line) * len(line)))
            for _ in range(total // len(line)):
                writer.write(line)
                await writer.drain()  # waits while the client does not read
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = httpx.URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{PATH}")
        client = FastHTTP()
        most, n = 0, 0
        try:
            r = await client.request(url, b"{}", {}, connect_timeout=2.0, read_timeout=5.0)
            async for _ in r.aiter_lines():
                n += 1
                most = max(most, r._conn.buffered)
                if n % 50 == 0:
                    await asyncio.sleep(0.01)  # a slow reader
        finally:
            await client.aclose()
            server.close()
        assert n == total // len(line)
        return most

    most = asyncio.run(asyncio.wait_for(main(), 30))
    assert most <= HIGH_WATER + 512 * 1024  # one socket read past the mark at most


def test_repeated_headers_are_joined_in_order():
    wire = b"HTTP/1.1 200 OK\r\nVary: a\r\nX-T: 1\r\nvary: b\r\nX-T: 2\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> httpx.Headers:
        async with Scripted([[wire]]) as srv:
            client = FastHTTP()
            try:
                r = await client.request(srv.url, b"{}", {}, connect_timeout=2.0, read_timeout=1.0)
                assert await r.aread() == b"ok"
                return r.headers
            finally:
                await client.aclose()

    headers = asyncio.run(main())
    assert headers["vary"] == "a, b" and headers["x-t"] == "1, 2"


def test_aread_refuses_a_body_over_its_limit():
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000

    async def main() -> None:
        async with Scripted([[wire]]) as srv:
            client = FastHTTP()
            try:
                r = await client.request(srv.url, b"{}", {}, connect_timeout=2.0, read_timeout=1.0)
                with pytest.raises(httpx.RemoteProtocolError, match="over 1000 bytes"):
                    await r.aread(max_bytes=1000)
            finally:
                await client.aclose()

    asyncio.run(main())
