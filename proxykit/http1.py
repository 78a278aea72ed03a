"""proxykit's upstream HTTP/1.1 client: keep-alive connections over asyncio, responses parsed by httptools.

    client = Http1Client(max_connections=1000)
    response = await client.open("POST", "https://api.example.com/v1/chat/completions", headers, body, timeouts)
    while chunk := await response.read_chunk(): ...
    await response.aclose()

Why a client of its own: proxykit's own work is a few dozen microseconds a request, and
aiohttp's `ClientSession` spends more than that on every call (request and response objects,
multidicts, URL objects, trace hooks, a timer per read). The benchmark's floor proxy serves
~3x the requests per second when it sends through this client instead of aiohttp. httptools is
uvicorn's parser and already a dependency: it does the framing (lengths, chunked, keep-alive).

It carries the duties a library would: response headers bounded (`MAX_HEAD_BYTES`), idle
connections closed on a timer, egress proxies (`proxykit.egress`), TLS verified. What it does
not do, because an LLM gateway's upstreams do not need it: HTTP/2, redirects, cookies,
decompression (bodies pass as raw bytes). Errors are httpx's, and their messages never name
the upstream.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
from collections.abc import AsyncIterable, Mapping
from typing import Final, NamedTuple, cast
from urllib.parse import quote, urlsplit

import httptools
import httpx

from proxykit.egress import Proxy, ProxyRules, open_tunnel

RawHeaders = list[tuple[bytes, bytes]]

# A response read ahead of a slow client stops being read from the socket above this many
# bytes (the upstream then waits on TCP), and is read again below the second.
PAUSE_ABOVE: Final = 256 * 1024
RESUME_BELOW: Final = 64 * 1024
# Sent again once on a fresh connection when a kept-alive one turns out closed before any byte
# of the answer: only these methods, as aiohttp and urllib3 do. A POST may have been acted on.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_CHUNKED: Final = b"transfer-encoding: chunked"
# An answer whose status line and headers are larger than this is refused: a hostile upstream
# must not make proxykit hold megabytes of headers. Real ones send a few KiB.
MAX_HEAD_BYTES: Final = 64 * 1024


class MalformedResponse(httpx.RemoteProtocolError):
    """The upstream answered, but not with a usable HTTP/1.1 response: a failure of that attempt
    (like a 5xx), not of the connection (which would skip the whole deployment)."""


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int


class _Target(NamedTuple):
    origin: Origin
    request_target: bytes  # path and query, percent-encoded
    host_header: bytes


Route = tuple[Origin, Proxy | None]  # what a pooled connection is connected to


class _StaleConnection(Exception):
    """A kept-alive connection was closed by the upstream before the request got any answer."""


class Http1Response:
    """One response as `proxykit.upstream.UpstreamResponse`, fed by its connection as bytes arrive."""

    def __init__(self, connection: _Connection, *, head_request: bool) -> None:
        self.status = 0
        self.reason = ""
        self.raw_headers: RawHeaders = []  # names in lowercase
        self._connection = connection
        self._head_request = head_request  # the answer to HEAD has no body, whatever its length says
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._started = False  # headers in
        self._complete = False  # the whole body in
        self._keep_alive = False
        self._error: Exception | None = None  # an httpx error, or _StaleConnection inside open()
        self._waiter: asyncio.Future[None] | None = None
        self._silence_timer: asyncio.TimerHandle | None = None
        self._read_timeout: float | None = None
        self._last_read_at = 0.0
        self._closed = False

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.raw_headers:
            if key == wanted:
                return value.decode("latin-1")
        return None

    async def read_chunk(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._complete:
                return b""
            await self._more()
        chunk = chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < RESUME_BELOW and self._connection.reading_paused:
            self._connection.resume_reading()
        return chunk

    def at_eof(self) -> bool:
        return self._complete and not self._chunks

    async def aclose(self) -> None:
        # Synchronous underneath, so a cancelled forwarding task cannot skip it half way: a fully
        # read answer gives its connection back, anything else closes it.
        if self._closed:
            return
        self._closed = True
        self._stop_silence_timer()
        if self._complete and self._keep_alive and not self._chunks:
            self._connection.release()
        else:
            self._connection.close()

    async def _wait_for_start(self, read_timeout: float | None) -> None:
        self._read_timeout = read_timeout
        while not self._started:
            await self._more()

    def _more(self) -> asyncio.Future[None]:
        """A future done when more of the response arrived, or it failed; the caller looks again,
        so pieces that came before a failure are read before it. A plain function, not a
        coroutine: one frame less on every read of every stream."""
        if self._error is not None:
            raise self._error
        loop = self._connection.loop
        # Silence counts from the later of the last data and now: a client that was slow to ask
        # for more (the socket unread meanwhile) is not an upstream gone quiet.
        self._last_read_at = loop.time()
        if self._silence_timer is None and self._read_timeout is not None:
            self._silence_timer = loop.call_at(self._last_read_at + self._read_timeout, self._check_silence)
        self._waiter = waiter = loop.create_future()
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_silence(self) -> None:
        """One timer a response, not one a read: it fires at the earliest moment the upstream can
        have been silent for `read` seconds, and is set again when data came in meanwhile or no
        one was waiting."""
        self._silence_timer = None
        if self._complete or self._error is not None or self._read_timeout is None:
            return
        loop = self._connection.loop
        due = self._last_read_at + self._read_timeout
        if self._waiter is None or self._waiter.done():  # no one waits: the client is slow, not the upstream
            due = loop.time() + self._read_timeout
        elif loop.time() >= due:
            self._fail(httpx.ReadTimeout("the upstream sent nothing for longer than the read timeout"))
            self._connection.close()
            return
        self._silence_timer = loop.call_at(due, self._check_silence)

    def _stop_silence_timer(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None

    # Called by the connection as the parser reads the answer.

    def _headers_complete(self, status: int) -> None:
        self.status = status
        self._started = True
        if self._head_request:  # no body follows; the connection cannot be told so, and closes
            self._complete = True
            self._stop_silence_timer()
        self._wake()

    def _body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > PAUSE_ABOVE:
            self._connection.pause_reading()
        self._wake()

    def _message_complete(self, keep_alive: bool) -> None:
        self._complete = True
        self._keep_alive = keep_alive and not self._head_request
        self._stop_silence_timer()
        self._wake()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._complete:
            return
        if self._started and exc is None and not any(
            name in (b"content-length", b"transfer-encoding") for name, _ in self.raw_headers
        ):
            self._message_complete(keep_alive=False)  # a body without a length ends with a clean close
        elif self._started:
            self._fail(httpx.ReadError("the upstream closed the connection in the middle of the response"))
        else:
            self._fail(_StaleConnection() if self._connection.reused else _closed_before_answering())

    def _fail(self, error: httpx.TransportError | _StaleConnection) -> None:
        if self._error is None and not self._complete:
            self._error = error
            self._stop_silence_timer()
            self._wake()


def _closed_before_answering() -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError("the upstream closed the connection without answering")


class _Connection(asyncio.Protocol):
    """One socket to an upstream, serving one response at a time."""

    def __init__(self, client: Http1Client, route: Route, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.route = route
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.response: Http1Response | None = None
        self.closed = False
        self.reused = False  # served an answer before: its first failure may be a stale keep-alive
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self.reading_paused = False
        self._informational = False  # inside a 1xx answer, which another answer follows
        self._head_bytes = 0  # of the answer in progress, until its headers are complete
        self._drained: asyncio.Future[None] | None = None

    def send(self, head: bytes, body: bytes, *, head_request: bool) -> Http1Response:
        assert self.transport is not None
        self.response = response = Http1Response(self, head_request=head_request)
        self._head_bytes = 0
        # One write, one system call: copying a body of a few KB costs less than a second call.
        if len(body) <= 65536:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        return response

    async def send_streamed(self, head: bytes, body: AsyncIterable[bytes], *, head_request: bool) -> Http1Response:
        assert self.transport is not None
        self.response = response = Http1Response(self, head_request=head_request)
        self._head_bytes = 0
        self.transport.write(head)
        async for part in body:
            if part:
                self.transport.writelines((b"%x\r\n" % len(part), part, b"\r\n"))
                if self._drained is not None:  # the socket is full: wait for it to take more
                    await self._drained
        self.transport.write(b"0\r\n\r\n")
        return response

    def release(self) -> None:
        self.response = None
        self.reused = True
        self.client.give_back(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.forget(self)
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response._complete:  # bytes no request asked for: the stream is off
            self.close()
            return
        response._last_read_at = self.loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # a 101 switches protocols
            response._fail(MalformedResponse("the upstream's answer is not valid HTTP/1.1"))
            self.close()
            return
        if not response._started:
            # Counted after parsing: the read that completes the headers may carry body bytes too.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                response._fail(MalformedResponse(f"the upstream's headers are larger than {MAX_HEAD_BYTES} bytes"))
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.client.forget(self)
        if self.response is not None:
            self.response._connection_lost(exc)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # httptools callbacks, for the response in progress

    def on_message_begin(self) -> None:
        assert self.response is not None
        self.response.raw_headers = []

    def on_status(self, reason: bytes) -> None:
        assert self.response is not None
        self.response.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.raw_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        status = self._parser.get_status_code()
        if status == 101:
            raise MalformedResponse("the upstream switched protocols")  # ends the parse: see data_received
        # A 1xx (100 Continue, 103 Early Hints) is followed by the real answer on the same stream.
        self._informational = 100 <= status < 200
        if not self._informational:
            self.response._headers_complete(status)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._body(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        if self._informational:
            self._informational = False
            return
        self.response._message_complete(self._parser.should_keep_alive())


class Http1Client:
    """Keep-alive connection pools, one per origin (and egress proxy), at most `max_connections`
    open in all.

    `open()` is `proxykit.upstream.Upstream`: what the forwarder calls. Idle connections are
    reused most recent first (the warmest), and closed by a timer once idle for
    `keepalive_expiry` seconds.
    """

    def __init__(
        self, *, max_connections: int = 1000, keepalive_expiry: float = 30.0, ssl_context: ssl.SSLContext | None = None,
        proxies: ProxyRules | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._proxies = proxies if proxies is not None and proxies.active else None
        self._idle: dict[Route, collections.deque[_Connection]] = {}
        self._connections: set[_Connection] = set()  # open or opening
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # the one every connection belongs to
        self._expiry_timer: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def open(
        self, method: str, url: str, headers: RawHeaders, body: bytes | AsyncIterable[bytes],
        timeouts: Mapping[str, float | None],
    ) -> Http1Response:
        """Sends a request and returns once the response headers are in. `headers` carry neither
        `host` nor framing (`content-length`, `transfer-encoding`): the client sets those."""
        self._check_loop()
        target = _target(url)
        origin = target.origin
        proxy = self._proxies.proxy_for(origin.scheme, origin.host, url) if self._proxies is not None else None
        route = (origin, proxy)
        streamed = not isinstance(body, bytes)
        framing = _CHUNKED if streamed else b"content-length: %d" % len(body)  # type: ignore[arg-type]
        head = _head(method, target, headers, framing, proxy if origin.scheme == "http" else None)
        head_request = method == "HEAD"
        while True:
            connection = self._idle_connection(route)
            if connection is None:
                connection = await self._connect(route, timeouts)
            try:
                if streamed:
                    response = await connection.send_streamed(head, body, head_request=head_request)  # type: ignore[arg-type]
                else:
                    response = connection.send(head, body, head_request=head_request)  # type: ignore[arg-type]
                await response._wait_for_start(timeouts.get("read"))
                return response
            except _StaleConnection:
                connection.close()
                if streamed or method not in _IDEMPOTENT:
                    raise _closed_before_answering() from None
            except BaseException:
                connection.close()  # cancelled or failed half way: the stream's state is unknown
                raise

    def _check_loop(self) -> None:
        # A host may run the app on one event loop after another (Starlette's TestClient outside
        # a `with` block runs each request on a new one). Connections of an earlier loop cannot
        # be used, nor closed, from this one: they are let go. Asking the known loop for its
        # current task is cheap; `get_running_loop()` costs a system call on Python 3.11.
        if self._loop is not None and asyncio.current_task(self._loop) is not None:
            return
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._idle.clear()
            self._connections.clear()
            self._slot_waiters.clear()
            self._expiry_timer = None
            self._loop = loop

    def _idle_connection(self, route: Route) -> _Connection | None:
        idle = self._idle.get(route)
        while idle:
            connection = idle.pop()
            if not connection.closed and not connection.transport.is_closing():  # type: ignore[union-attr]
                if connection.loop.time() - connection.idle_since < self.keepalive_expiry:
                    return connection
                connection.close()
        return None

    async def _connect(self, route: Route, timeouts: Mapping[str, float | None]) -> _Connection:
        loop = self._loop  # set by `_check_loop()` for this request
        assert loop is not None
        while len(self._connections) >= self.max_connections:
            if not self._close_one_idle():
                await self._wait_for_slot(loop, timeouts.get("pool"))
                if (connection := self._idle_connection(route)) is not None:
                    return connection
        connection = _Connection(self, route, loop)
        self._connections.add(connection)
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                await self._open_socket(loop, connection)
        except BaseException as exc:
            connection.close()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout("connecting to the upstream timed out") from None
            if isinstance(exc, OSError):  # refused, unreachable, no such host, TLS refused
                raise httpx.ConnectError(f"could not connect to the upstream ({type(exc).__name__})") from None
            raise
        return connection

    async def _open_socket(self, loop: asyncio.AbstractEventLoop, connection: _Connection) -> None:
        origin, proxy = connection.route
        tls = self._ssl() if origin.scheme == "https" else None
        if proxy is None:
            await loop.create_connection(lambda: connection, origin.host, origin.port, ssl=tls)
        elif tls is None:  # plain HTTP goes to the proxy, which forwards it (absolute-form target)
            await loop.create_connection(lambda: connection, proxy.host, proxy.port)
        else:  # HTTPS goes through a CONNECT tunnel, and TLS runs end to end inside it
            tunnel = await open_tunnel(loop, proxy, origin.host, origin.port)
            try:
                transport = await loop.start_tls(tunnel, connection, tls, server_hostname=origin.host)
            except BaseException:
                tunnel.close()
                raise
            assert transport is not None
            connection.connection_made(transport)

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        waiter = loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if not waiter.done():
                self._slot_waiters.remove(waiter)
            elif not waiter.cancelled():
                self._wake_slot_waiter()  # woken, then cancelled or timed out: the slot goes to the next
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout("every upstream connection stayed busy") from None
            raise

    def _close_one_idle(self) -> bool:
        for idle in self._idle.values():
            while idle:
                connection = idle.popleft()
                if not connection.closed:
                    connection.close()
                    return True
        return False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # system CAs (SSL_CERT_FILE too), hostname checked
        return self._ssl_context

    def give_back(self, connection: _Connection) -> None:
        """A connection whose answer was read whole: idle until the next request to its origin."""
        if connection.closed:
            return
        connection.idle_since = connection.loop.time()
        idle = self._idle.get(connection.route)
        if idle is None:
            idle = self._idle[connection.route] = collections.deque()
        idle.append(connection)
        if self._expiry_timer is None:
            self._expiry_timer = connection.loop.call_later(self.keepalive_expiry, self._expire_idle)
        self._wake_slot_waiter()

    def _expire_idle(self) -> None:
        """Closes connections idle for `keepalive_expiry`, and comes back when the next one will be.
        Each deque holds the oldest on the left."""
        self._expiry_timer = None
        if self._loop is None:
            return
        now = self._loop.time()
        soonest = None
        for idle in self._idle.values():
            while idle and (idle[0].closed or now - idle[0].idle_since >= self.keepalive_expiry):
                idle.popleft().close()
            if idle:
                due = idle[0].idle_since + self.keepalive_expiry
                soonest = due if soonest is None else min(soonest, due)
        if soonest is not None:
            self._expiry_timer = self._loop.call_at(soonest, self._expire_idle)

    def forget(self, connection: _Connection) -> None:
        """A connection closed, by either side."""
        self._connections.discard(connection)
        self._wake_slot_waiter()

    def _wake_slot_waiter(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        for connection in list(self._connections):
            connection.close()
        self._idle.clear()


@functools.lru_cache(maxsize=1024)
def _target(url: str) -> _Target:
    # A gateway sends to the same few URLs all day; bounded, since clients choose paths and queries.
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol("the upstream URL must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise httpx.UnsupportedProtocol("the upstream URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise httpx.UnsupportedProtocol("the upstream URL has an invalid port") from None
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host_header = f"{host_header}:{parts.port}"
    # Paths reach the forwarder decoded (ASGI `path`): encode what may not appear in a request
    # line, and leave reserved characters and existing escapes as they are.
    request_target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
    if parts.query:
        request_target = f"{request_target}?{quote(parts.query, safe='/?%:@!$&()*+,;=~[]')}"
    return _Target(Origin(parts.scheme, host, port), request_target.encode("ascii"), host_header.encode("idna"))


def _head(method: str, target: _Target, headers: RawHeaders, framing: bytes, proxy: Proxy | None = None) -> bytes:
    request_target = target.request_target
    if proxy is not None:  # an HTTP proxy is asked for the absolute URL (RFC 9112 section 3.2.2)
        request_target = b"http://" + target.host_header + request_target
    lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"), request_target), b"host: " + target.host_header]
    lines += [name + b": " + value for name, value in headers]
    if proxy is not None and proxy.authorization is not None:
        lines.append(b"proxy-authorization: " + proxy.authorization)
    lines.append(framing)
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    # One line break per line and no other: a header value holding one would smuggle a header.
    if head.count(b"\n") != len(lines) + 1 or head.count(b"\r") != len(lines) + 1:
        raise httpx.LocalProtocolError("a request header holds a line break")
    return head
