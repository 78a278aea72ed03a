"""proxykit's own HTTP/1.1 client against real sockets: keep-alive, framing, failures, limits.

Upstreams that misbehave on purpose are scripted asyncio servers on 127.0.0.1; well-behaved
ones are real uvicorn servers. One ordering that a socket cannot be made to produce is played by
hand on a connection without one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit.upstream.http1.client import Http1Client
from proxykit.upstream.http1.connection import Connection, Origin
from proxykit.upstream.http1.response import PAUSE_ABOVE, Http1Response
from tests.conftest import free_port, serve
from tests.upstreams import Records, read_body

pytestmark = pytest.mark.anyio

TIMEOUTS = {"connect": 5.0, "read": 5.0, "pool": 5.0}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A raw TCP upstream: `handler` runs once per connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []  # request heads, in arrival order

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        self.requests.append(head)
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up: part of several tests
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()


def keeps_answering(scripted: Scripted, answer: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok") -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await scripted.read_request(reader)
            writer.write(answer)

    return handler


async def read_all(response: Http1Response) -> bytes:
    body = b""
    while chunk := await response.read_chunk():
        body += chunk
    await response.aclose()
    return body


async def send(
    client: Http1Client, url: str, method: str = "POST", body: bytes = b"{}", **timeouts: float | None,
) -> bytes:
    return await read_all(await client.open(method, url, [], body, {**TIMEOUTS, **timeouts}))


async def test_one_connection_serves_request_after_request() -> None:
    scripted = Scripted(lambda r, w: keeps_answering(scripted)(r, w))
    client = Http1Client()
    async with scripted.running() as url:
        assert [await send(client, f"{url}/v1/x") for _ in range(3)] == [b"ok"] * 3
        await client.aclose()
    assert scripted.connections == 1
    assert len(scripted.requests) == 3


async def test_an_idle_connection_the_upstream_closed_is_not_used_again() -> None:
    scripted = Scripted(lambda r, w: answer_once(r, w))

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # keep-alive, then closes anyway

    client = Http1Client()
    async with scripted.running() as url:
        for _ in range(3):
            assert await send(client, url) == b"ok"
            with anyio.fail_after(5):
                while client.open_connections:  # the close reaches the client
                    await anyio.sleep(0.01)
        await client.aclose()
    assert scripted.connections == 3


@pytest.mark.parametrize(("method", "resent"), [
    pytest.param("GET", True, id="GET-sent-again"),
    pytest.param("POST", False, id="POST-not-sent-twice"),
])
async def test_a_kept_alive_connection_closed_before_answering(method: str, resent: bool) -> None:
    # The race a pool cannot avoid: the upstream closes an idle connection just as a request goes out.
    scripted = Scripted(lambda r, w: answer_then_drop_the_next(r, w))

    async def answer_then_drop_the_next(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await scripted.read_request(reader)  # closes without a word

    client = Http1Client()
    async with scripted.running() as url:
        assert await send(client, url, method) == b"ok"
        if resent:
            assert await send(client, url, method) == b"ok"
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                await send(client, url, method)
        await client.aclose()
    assert scripted.connections == (2 if resent else 1)


async def test_a_silent_upstream_is_a_read_timeout_before_and_after_the_headers() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await scripted.read_request(reader)
        if b"/after" in head:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
        await reader.read()  # nothing more until the client hangs up

    scripted = Scripted(stalls)
    client = Http1Client()
    async with scripted.running() as url:
        with anyio.fail_after(5), pytest.raises(httpx.ReadTimeout):
            await client.open("POST", f"{url}/before", [], b"{}", {**TIMEOUTS, "read": 0.2})
        response = await client.open("POST", f"{url}/after", [], b"{}", {**TIMEOUTS, "read": 0.2})
        assert await response.read_chunk() == b"ab"
        with anyio.fail_after(5), pytest.raises(httpx.ReadTimeout):
            await response.read_chunk()
        await response.aclose()
        await client.aclose()


async def test_a_client_slower_than_the_read_timeout_is_not_the_upstream_going_silent() -> None:
    # Silence counts from the later of the last data and the moment the client asked for more.
    next_part = asyncio.Event()

    async def answers_when_told(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
        await next_part.wait()
        await asyncio.sleep(0.25)  # half the read timeout after the client asked
        writer.write(b"cd")
        await reader.read()

    scripted = Scripted(answers_when_told)
    client = Http1Client()
    async with scripted.running() as url:
        response = await client.open("POST", url, [], b"{}", {**TIMEOUTS, "read": 0.5})
        assert await response.read_chunk() == b"ab"
        loop = asyncio.get_running_loop()
        await anyio.sleep(1.2)  # a slow client: two read timeouts without asking for more
        check_at = response.next_silence_check
        assert check_at is not None
        await asyncio.sleep(max(0.0, check_at - loop.time() - 0.05))  # ask just before the timer's check
        next_part.set()
        with anyio.fail_after(5):
            assert await read_all(response) == b"cd"
        await client.aclose()


@pytest.mark.parametrize(("answer", "outcome"), [
    pytest.param(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello world", b"hello world",
                 id="no-length-ends-with-the-connection"),
    pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part", httpx.ReadError, id="cut-short"),
    pytest.param(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", httpx.ReadError,
                 id="chunked-cut-short"),
    pytest.param(b"this is not http\r\n\r\n", httpx.RemoteProtocolError, id="not-http"),
    pytest.param(b"", httpx.RemoteProtocolError, id="closed-without-answering"),
])
async def test_an_answer_ended_by_the_connection(answer: bytes, outcome: bytes | type[Exception]) -> None:
    async def answers_and_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(answer)

    scripted = Scripted(answers_and_closes)
    client = Http1Client()
    async with scripted.running() as url:
        with anyio.fail_after(5):
            if isinstance(outcome, bytes):
                assert await send(client, url) == outcome
            else:
                with pytest.raises(outcome):
                    await send(client, url)
        await client.aclose()


async def test_a_body_without_a_length_cut_by_a_reset_is_a_read_error() -> None:
    async def answers_and_resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a RST
        writer.transport.abort()

    scripted = Scripted(answers_and_resets)
    client = Http1Client()
    async with scripted.running() as url:
        response = await client.open("POST", url, [], b"{}", TIMEOUTS)
        with anyio.fail_after(5), pytest.raises(httpx.ReadError):
            await read_all(response)  # not a complete body: the connection broke, it did not end
        await response.aclose()
        await client.aclose()


async def test_informational_answers_are_skipped() -> None:
    async def hints_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await scripted.read_request(reader)
            for part in (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.02)  # each in a socket read of its own
            writer.write(b"HTTP/1.1 201 Created\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok")

    scripted = Scripted(hints_first)
    client = Http1Client()
    async with scripted.running() as url:
        response = await client.open("POST", url, [], b"{}", TIMEOUTS)
        assert (response.status, response.raw_headers) == (201, [(b"x-a", b"1"), (b"content-length", b"2")])
        assert await read_all(response) == b"ok"
        assert await send(client, url) == b"ok"  # and the connection stays usable
        await client.aclose()
    assert scripted.connections == 1


async def test_the_answer_to_head_has_no_body_whatever_its_length_says() -> None:
    scripted = Scripted(lambda r, w: keeps_answering(scripted, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")(r, w))
    client = Http1Client()
    async with scripted.running() as url:
        with anyio.fail_after(5):
            assert await send(client, url, "HEAD", b"") == b""
        await client.aclose()


async def test_a_header_holding_a_line_break_is_refused_before_anything_is_sent() -> None:
    upstream = Records()
    client = Http1Client()
    async with serve(upstream, lifespan="off") as url:
        for value in (b"1\r\nx-injected: yes", b"1\nx-injected: yes", b"1\rx"):
            with pytest.raises(httpx.LocalProtocolError):
                await client.open("POST", url, [(b"x-a", value)], b"{}", TIMEOUTS)
        await client.aclose()
    assert upstream.bodies == []


async def test_paths_are_percent_encoded_and_queries_kept() -> None:
    scripted = Scripted(lambda r, w: keeps_answering(scripted)(r, w))
    client = Http1Client()
    async with scripted.running() as url:
        await send(client, f"{url}/v1/a b/é?x=1%202&y")
        await client.aclose()
    assert scripted.requests[0].startswith(b"POST /v1/a%20b/%C3%A9?x=1%202&y HTTP/1.1\r\n")
    assert b"\r\nhost: 127.0.0.1:" in scripted.requests[0]


async def test_at_most_max_connections_and_the_rest_wait_for_one() -> None:
    release = asyncio.Event()

    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await scripted.read_request(reader)
            if b"/slow" in head:
                await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    scripted = Scripted(slow_first)
    client = Http1Client(max_connections=1)
    async with scripted.running() as url:
        with anyio.fail_after(5):
            slow = asyncio.ensure_future(send(client, f"{url}/slow"))
            while not scripted.requests:
                await anyio.sleep(0.01)
            with pytest.raises(httpx.PoolTimeout):  # the one connection stays busy past the pool timeout
                await send(client, f"{url}/fast", pool=0.1)
            waiting = asyncio.ensure_future(send(client, f"{url}/fast"))
            await anyio.sleep(0.1)
            assert not waiting.done() and client.open_connections == 1
            release.set()
            assert (await slow, await waiting) == (b"ok", b"ok")
        await client.aclose()
    assert scripted.connections == 1


async def test_at_the_limit_an_idle_connection_to_another_upstream_makes_room() -> None:
    first, second = (Scripted(lambda r, w: keeps_answering(first)(r, w)),
                     Scripted(lambda r, w: keeps_answering(second)(r, w)))
    client = Http1Client(max_connections=1)
    async with first.running() as first_url, second.running() as second_url:
        with anyio.fail_after(5):
            assert await send(client, first_url) == b"ok"  # its connection stays open, idle
            assert await send(client, second_url) == b"ok"
            assert await send(client, first_url) == b"ok"
        await client.aclose()
    assert (first.connections, second.connections) == (2, 1)


async def test_idle_connections_expire() -> None:
    scripted = Scripted(lambda r, w: keeps_answering(scripted)(r, w))
    client = Http1Client(keepalive_expiry=0.05)
    async with scripted.running() as url:
        await send(client, url)
        await anyio.sleep(0.1)  # longer than the expiry
        await send(client, url)
        await client.aclose()
    assert scripted.connections == 2


async def test_idle_connections_are_closed_by_a_timer_without_another_request() -> None:
    scripted = Scripted(lambda r, w: keeps_answering(scripted)(r, w))
    client = Http1Client(keepalive_expiry=0.3)
    async with scripted.running() as url:
        with anyio.fail_after(5):
            await asyncio.gather(*(send(client, url) for _ in range(6)))  # a burst: several connections
            assert client.open_connections > 1
            while client.open_connections:  # no request comes: the timer alone closes them
                await anyio.sleep(0.05)
        await client.aclose()


async def test_a_woken_waiter_that_is_cancelled_passes_the_slot_on() -> None:
    scripted = Scripted(lambda r, w: keeps_answering(scripted)(r, w))
    client = Http1Client(max_connections=1)
    async with scripted.running() as url:
        with anyio.fail_after(5):
            busy = await client.open("POST", url, [], b"{}", TIMEOUTS)  # holds the one connection
            first = asyncio.ensure_future(send(client, f"{url}/a"))
            second = asyncio.ensure_future(send(client, f"{url}/b"))
            await anyio.sleep(0.05)  # both wait for the connection
            while await busy.read_chunk():
                pass
            await busy.aclose()  # synchronous underneath: gives the connection back, wakes `first`...
            first.cancel()  # ...which is cancelled before it runs: the slot must reach `second`
            assert await second == b"ok"
        await client.aclose()


async def test_a_client_that_stops_reading_stops_the_socket_being_read() -> None:
    total = 16 * 1024 * 1024

    async def floods(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(total // 65536):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    client = Http1Client()
    async with serve(floods, lifespan="off") as url:
        response = await client.open("POST", url, [], b"{}", TIMEOUTS)
        await anyio.sleep(0.5)  # the upstream writes as fast as it can; no one reads
        # Held in memory: what was read before the pause, and at most one more socket read.
        assert PAUSE_ABOVE <= response.buffered <= PAUSE_ABOVE + 1024 * 1024
        with anyio.fail_after(30):
            assert len(await read_all(response)) == total  # reading again resumes the socket
        await client.aclose()


@asynccontextmanager
async def serve_tls(app: ASGIApp, cert: Path, key: Path) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            ssl_certfile=str(cert), ssl_keyfile=str(key))
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_https_verifies_the_upstream_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    upstream = Records()
    async with serve_tls(upstream, cert, key) as url:
        untrusting = Http1Client()  # the system's CAs: a self-signed certificate is refused
        with pytest.raises(httpx.ConnectError):
            await send(untrusting, url)
        trusting = Http1Client(ssl_context=ssl.create_default_context(cafile=str(cert)))
        assert await send(trusting, url, body=b'{"a": 1}') == b'{"ok": true}'
        await untrusting.aclose()
        await trusting.aclose()
    assert upstream.bodies == [b'{"a": 1}']
    assert upstream.headers[0]["host"].startswith("127.0.0.1:")


class _Wire(asyncio.Transport):
    """A transport that goes nowhere: the test plays the upstream's part by hand."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def test_a_piece_that_came_with_the_break_is_read_before_the_error() -> None:
    # Over a real socket the two may or may not arrive in one loop turn; here they always do.
    loop = asyncio.get_running_loop()
    client = Http1Client()
    connection = Connection(client, (Origin("http", "upstream.test", 80), None), loop)
    connection.connection_made(_Wire())
    response = connection.send(b"GET / HTTP/1.1\r\n\r\n", b"", head_request=False)
    connection.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    await response.wait_for_start(5.0, until_start=5.0)
    reading = asyncio.ensure_future(response.read_chunk())
    await asyncio.sleep(0)  # the read waits for a piece
    connection.data_received(b"5\r\nhello\r\n")
    connection.connection_lost(None)
    with anyio.fail_after(5):
        assert await reading == b"hello"
        with pytest.raises(httpx.ReadError):
            await response.read_chunk()
    await response.aclose()
    await client.aclose()


async def test_read_bounds_only_the_silence_between_chunks_when_the_caller_keeps_the_first_byte_deadline() -> None:
    async def slow_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        await asyncio.sleep(0.6)  # longer than `read`: the wait for headers is the first-byte deadline's
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await reader.read()

    scripted = Scripted(slow_headers)
    client = Http1Client()
    async with scripted.running() as url:
        with anyio.fail_after(5):
            # As the forwarder calls it: `first_byte` None, its own watch keeps that deadline.
            assert await send(client, url, read=0.3, first_byte=None) == b"ok"
            with pytest.raises(httpx.ReadTimeout):  # httpx's semantics, without `first_byte`
                await send(client, url, read=0.3)
        await client.aclose()
