"""One HTTP/1.1 response, fed by its connection as bytes arrive and read by the forwarder as
`proxykit.upstream.base.UpstreamResponse`. The methods under "Called by the connection" are the
connection's to call, nobody else's."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Final

import httpx

if TYPE_CHECKING:
    from proxykit.upstream.http1.connection import Connection

RawHeaders = list[tuple[bytes, bytes]]

# A response read ahead of a slow client stops being read from the socket above this many
# bytes (the upstream then waits on TCP), and is read again below the second.
PAUSE_ABOVE: Final = 256 * 1024
RESUME_BELOW: Final = 64 * 1024


class MalformedResponse(httpx.RemoteProtocolError):
    """The upstream answered, but not with a usable HTTP/1.1 response: a failure of that attempt
    (like a 5xx), not of the connection (which would skip the whole deployment)."""


class StaleConnection(Exception):
    """A kept-alive connection was closed by the upstream before the request got any answer."""


class Http1Response:
    """One response as `proxykit.upstream.UpstreamResponse`, fed by its connection as bytes arrive."""

    def __init__(self, connection: Connection, *, head_request: bool) -> None:
        self.status = 0
        self.reason = ""
        self.raw_headers: RawHeaders = []  # names in lowercase
        self._connection = connection
        self._head_request = head_request  # the answer to HEAD has no body, whatever its length says
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self.started = False  # headers in
        self.complete = False  # the whole body in
        self._keep_alive = False
        self._error: Exception | None = None  # an httpx error, or StaleConnection inside open()
        self._waiter: asyncio.Future[None] | None = None
        self._silence_timer: asyncio.TimerHandle | None = None
        self._read_timeout: float | None = None
        self.last_read_at = 0.0
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes of the body read from the socket and not yet taken by `read_chunk()`."""
        return self._buffered

    @property
    def next_silence_check(self) -> float | None:
        """When (event loop time) the read timeout is next checked, if a check is due."""
        return self._silence_timer.when() if self._silence_timer is not None else None

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.raw_headers:
            if key == wanted:
                return value.decode("latin-1")
        return None

    async def read_chunk(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self.complete:
                return b""
            await self._more()
        chunk = chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < RESUME_BELOW and self._connection.reading_paused:
            self._connection.resume_reading()
        return chunk

    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    async def aclose(self) -> None:
        # Synchronous underneath, so a cancelled forwarding task cannot skip it half way: a fully
        # read answer gives its connection back, anything else closes it.
        if self._closed:
            return
        self._closed = True
        self._stop_silence_timer()
        if self.complete and self._keep_alive and not self._chunks:
            self._connection.release()
        else:
            self._connection.close()

    async def wait_for_start(self, read_timeout: float | None, *, until_start: float | None) -> None:
        """Waits for the status line and headers, with `until_start` as the longest silence meanwhile;
        from then on `read_timeout` bounds the silence between body chunks."""
        self._read_timeout = until_start
        while not self.started:
            await self._more()
        if read_timeout != until_start:
            self._stop_silence_timer()
            self._read_timeout = read_timeout

    def _more(self) -> asyncio.Future[None]:
        """A future done when more of the response arrived, or it failed; the caller looks again,
        so pieces that came before a failure are read before it. A plain function, not a
        coroutine: one frame less on every read of every stream."""
        if self._error is not None:
            raise self._error
        loop = self._connection.loop
        # Silence counts from the later of the last data and now: a client that was slow to ask
        # for more (the socket unread meanwhile) is not an upstream gone quiet.
        self.last_read_at = loop.time()
        if self._silence_timer is None and self._read_timeout is not None:
            self._silence_timer = loop.call_at(self.last_read_at + self._read_timeout, self._check_silence)
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
        if self.complete or self._error is not None or self._read_timeout is None:
            return
        loop = self._connection.loop
        due = self.last_read_at + self._read_timeout
        if self._waiter is None or self._waiter.done():  # no one waits: the client is slow, not the upstream
            due = loop.time() + self._read_timeout
        elif loop.time() >= due:
            self.fail(httpx.ReadTimeout("the upstream sent nothing for longer than the read timeout"))
            self._connection.close()
            return
        self._silence_timer = loop.call_at(due, self._check_silence)

    def _stop_silence_timer(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None

    # Called by the connection as the parser reads the answer.

    def headers_complete(self, status: int) -> None:
        self.status = status
        self.started = True
        if self._head_request:  # no body follows; the connection cannot be told so, and closes
            self.complete = True
            self._stop_silence_timer()
        self._wake()

    def body_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > PAUSE_ABOVE:
            self._connection.pause_reading()
        self._wake()

    def message_complete(self, keep_alive: bool) -> None:
        self.complete = True
        self._keep_alive = keep_alive and not self._head_request
        self._stop_silence_timer()
        self._wake()

    def connection_lost_by_peer(self, exc: Exception | None) -> None:
        if self.complete:
            return
        if self.started and exc is None and not any(
            name in (b"content-length", b"transfer-encoding") for name, _ in self.raw_headers
        ):
            self.message_complete(keep_alive=False)  # a body without a length ends with a clean close
        elif self.started:
            self.fail(httpx.ReadError("the upstream closed the connection in the middle of the response"))
        else:
            self.fail(StaleConnection() if self._connection.reused else closed_before_answering())

    def fail(self, error: httpx.TransportError | StaleConnection) -> None:
        if self._error is None and not self.complete:
            self._error = error
            self._stop_silence_timer()
            self._wake()


def closed_before_answering() -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError("the upstream closed the connection without answering")
