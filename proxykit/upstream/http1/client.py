"""proxykit's upstream HTTP/1.1 client: keep-alive connections over asyncio, responses parsed by httptools.

    client = Http1Client(max_connections=1000)
    response = await client.open("POST", "https://api.example.com/v1/chat/completions", headers, body, timeouts)
    while chunk := await response.read_chunk(): ...
    await response.aclose()

Why a client of its own: proxykit's own work is a few dozen microseconds a request, and
aiohttp's `ClientSession` spends more than that on every call (request and response objects,
multidicts, URL objects, trace hooks, a timer per read). httptools is uvicorn's parser and
already a dependency: it does the framing (lengths, chunked, keep-alive).

It carries the duties a library would: response headers bounded (`MAX_HEAD_BYTES`), idle
connections closed on a timer, egress proxies (`proxykit.upstream.proxy`), TLS verified. What it does
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
from typing import Final, NamedTuple
from urllib.parse import quote, urlsplit

import httpx

from proxykit.upstream.http1.connection import Connection, Origin, Route
from proxykit.upstream.http1.response import Http1Response, RawHeaders, StaleConnection, closed_before_answering
from proxykit.upstream.proxy import Proxy, ProxyRules, open_tunnel

# Sent again once on a fresh connection when a kept-alive one turns out closed before any byte
# of the answer: only these methods, as aiohttp and urllib3 do. A POST may have been acted on.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_CHUNKED: Final = b"transfer-encoding: chunked"

class _Target(NamedTuple):
    origin: Origin
    request_target: bytes  # path and query, percent-encoded
    host_header: bytes


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
        self._idle: dict[Route, collections.deque[Connection]] = {}
        self._connections: set[Connection] = set()  # open or opening
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # the one every connection belongs to
        self._expiry_timer: asyncio.TimerHandle | None = None

    @property
    def proxies(self) -> ProxyRules | None:
        return self._proxies

    @proxies.setter
    def proxies(self, rules: ProxyRules | None) -> None:
        """New egress rules (a reload): connections are pooled by (origin, proxy), so a request
        never reuses a connection made through another proxy."""
        self._proxies = rules if rules is not None and rules.active else None

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
                # `first_byte` in `timeouts` (the forwarder's, None) means its caller keeps that
                # deadline; httpx's own timeouts have none, and `read` bounds the wait, as in httpx.
                read = timeouts.get("read")
                await response.wait_for_start(read, until_start=timeouts.get("first_byte", read))
                return response
            except StaleConnection:
                connection.close()
                if streamed or method not in _IDEMPOTENT:
                    raise closed_before_answering() from None
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

    def _idle_connection(self, route: Route) -> Connection | None:
        idle = self._idle.get(route)
        while idle:
            connection = idle.pop()
            if not connection.closed and not connection.transport.is_closing():  # type: ignore[union-attr]
                if connection.loop.time() - connection.idle_since < self.keepalive_expiry:
                    return connection
                connection.close()
        return None

    async def _connect(self, route: Route, timeouts: Mapping[str, float | None]) -> Connection:
        loop = self._loop  # set by `_check_loop()` for this request
        assert loop is not None
        while len(self._connections) >= self.max_connections:
            if not self._close_one_idle():
                await self._wait_for_slot(loop, timeouts.get("pool"))
                if (connection := self._idle_connection(route)) is not None:
                    return connection
        connection = Connection(self, route, loop)
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

    async def _open_socket(self, loop: asyncio.AbstractEventLoop, connection: Connection) -> None:
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

    def give_back(self, connection: Connection) -> None:
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

    def forget(self, connection: Connection) -> None:
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
