"""One socket to an upstream and its httptools parser, serving one response at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, Final, NamedTuple, cast

import httptools

from proxykit.upstream.http1.response import Http1Response, MalformedResponse
from proxykit.upstream.proxy import Proxy

if TYPE_CHECKING:
    from proxykit.upstream.http1.client import Http1Client

# An answer whose status line and headers are larger than this is refused: a hostile upstream
# must not make proxykit hold megabytes of headers. Real ones send a few KiB.
MAX_HEAD_BYTES: Final = 64 * 1024

JOINED_AT_MOST: Final = 65536  # bytes of body copied to join its head: cheaper than a second call


def write_together(transport: asyncio.WriteTransport, head: bytes, body: bytes | bytearray | memoryview) -> None:
    """A head and its body in one system call: copied together when the body is a few KB, one
    `writev` of both when it is larger."""
    if len(body) <= JOINED_AT_MOST:
        transport.write(head + body)
    else:
        transport.writelines((head, body))


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int


Route = tuple[Origin, Proxy | None]  # what a pooled connection is connected to


class Connection(asyncio.Protocol):
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
        write_together(self.transport, head, body)
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
        if response is None or response.complete:  # bytes no request asked for: the stream is off
            self.close()
            return
        response.last_read_at = self.loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # a 101 switches protocols
            response.fail(MalformedResponse("the upstream's answer is not valid HTTP/1.1"))
            self.close()
            return
        if not response.started:
            # Counted after parsing: the read that completes the headers may carry body bytes too.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                response.fail(MalformedResponse(f"the upstream's headers are larger than {MAX_HEAD_BYTES} bytes"))
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.client.forget(self)
        if self.response is not None:
            self.response.connection_lost_by_peer(exc)
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
            self.response.headers_complete(status)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response.body_received(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        if self._informational:
            self._informational = False
            return
        self.response.message_complete(self._parser.should_keep_alive())
