"""What `proxykit serve` adds to uvicorn: bounds on what a client may send before its request
starts, and a drain on SIGTERM that readiness probes can see.

    limits = ServerLimits(max_header_bytes=65536, max_headers=100, header_timeout=10.0)
    config = uvicorn.Config(app, http=limits.protocol(), timeout_graceful_shutdown=30)
    DrainingServer(config).run()

uvicorn's httptools protocol reads any number of header bytes, and waits for ever for a client
that sends half a request line or half a body: 48 MiB of headers were held whole, and
slowloris connections stayed open. The protocol here answers 431 past `max_header_bytes` or
`max_headers`, and 408 when a request's headers are not complete `header_timeout` seconds after
its first byte (or after the connection opened), or when its body pauses for `body_timeout`.

uvicorn also writes an answer's head and its body in two system calls, two packets. Here the
head of an answer of known length (`content-length`, not a stream) waits for the answer's first
body write and goes out with it, in one; a body write never waits, and a stream's head goes out
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.supervisors import Multiprocess

from proxykit.upstream.http1.connection import write_together

logger = logging.getLogger(__name__)

_REASONS: Final = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one request may send before the app sees it."""

    max_header_bytes: int = 64 * 1024  # request line and headers together
    max_headers: int = 100
    header_timeout: float = 10.0  # seconds from a request's first byte to the end of its headers
    body_timeout: float = 30.0  # seconds a request body may pause between two pieces

    def protocol(self) -> Callable[..., HttpToolsProtocol]:
        """The `http` of a `uvicorn.Config`: a protocol factory that uvicorn calls per connection."""
        return functools.partial(GuardedHttpToolsProtocol, limits=self)


class _Refused(Exception):
    """Raised from a parser callback: the request is answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of `ServerLimits`."""

    def __init__(self, *args: Any, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._too_large = f"the request's header block is larger than {limits.max_header_bytes} bytes"
        self._head_bytes = 0  # bytes read since the request began, while its headers are incomplete
        self._header_size = 0  # the request line and headers parsed so far
        self._header_count = 0
        self._in_head = True  # between a request's first byte and the end of its headers
        self._header_timer: Any = None
        self._body_timer: Any = None
        self._body_seen_at = 0.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_header_timer()  # a client that connects and sends nothing is timed out too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._disarm_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, but for the refusals: a parser callback's exception reaches here as an
        # HttpParserCallbackError whose context is what the callback raised.
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Refused):
                self._refuse(exc.__context__.status, exc.__context__.message)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            self.logger.warning("Unsupported upgrade request.")  # proxykit serves no WebSocket
            return
        if self.transport.is_closing():
            return
        if self._in_head:
            # A header the parser still assembles is not in `_header_size` yet: the raw count
            # bounds it. Checked after parsing: the read that ends the headers may carry body bytes.
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, self._too_large)
            elif self._head_bytes:
                self._arm_header_timer()  # headers incomplete after a read: timed from here on
        elif self.cycle is not None and self.cycle.more_body:
            # A body still arriving. Timers are set only here, so a request that arrives whole
            # in one read, the usual case, sets none.
            self._body_seen_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_check)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._header_size, self._header_count = True, 0, 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._header_size += len(url)
        self._check_header_size()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise _Refused(431, f"the request has more than {self.limits.max_headers} headers")
        self._header_size += len(name) + len(value) + 4
        self._check_header_size()
        super().on_header(name, value)

    def _check_header_size(self) -> None:
        if self._header_size > self.limits.max_header_bytes:
            raise _Refused(431, self._too_large)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_header_timer()
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle and self.cycle is not None:  # a new request's cycle
            self.cycle.transport = _HeadWithBody(self.transport, self.cycle)

    def on_message_complete(self) -> None:
        self._disarm_body_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_head, self._head_bytes = True, 0  # the next request's bytes count from here
        # Between requests uvicorn's keep-alive timeout runs; ours starts with the next byte.

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.cycle is None or not self.cycle.more_body:
            return
        due = self._body_seen_at + self.limits.body_timeout
        if self.flow.read_paused:  # the app is slow to read, not the client to send
            self._body_seen_at = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_check)
        elif self.loop.time() < due:
            self._body_timer = self.loop.call_at(due, self._body_check)
        elif self.cycle.response_started:
            self.transport.close()  # the app answered before the body was in: nothing left to say
        else:
            # The app waiting on the body learns of it as a disconnect; the client gets the 408.
            self._refuse(408, f"the request body paused for longer than {self.limits.body_timeout:g} s")

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(408, "the request's headers did not arrive in time")
            else:
                self.transport.close()  # nothing was asked: nothing to answer

    def _refuse(self, status: int, message: str) -> None:
        """An OpenAI-shaped error, then the connection closes: the rest of its bytes are not read."""
        self._disarm_header_timer()
        self._disarm_body_timer()
        logger.warning("refused a request before it started: %s", message)
        error = {"message": message, "type": "invalid_request_error",
                 "code": "request_timeout" if status == 408 else "request_header_fields_too_large",
                 "request_id": f"{random.getrandbits(128):032x}"}
        body = json.dumps({"error": error}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body)) + body
        )
        self.transport.close()


class _HeadWithBody(asyncio.Transport):
    """The transport as one request's response cycle sees it: the head of an answer of known
    length is held until the cycle's next write, its body's first piece, and both go in one call."""

    __slots__ = ("_cycle", "_head", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        super().__init__()
        self._transport = transport
        # Until its answer starts; then let go, or the cycle and this would be garbage only the
        # collector frees, a request at a time.
        self._cycle: RequestResponseCycle | None = cycle
        self._head = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._head:
            head, self._head = self._head, b""
            write_together(self._transport, head, data)
            return
        cycle = self._cycle
        if cycle is not None and cycle.response_started:  # this write is the answer's head
            self._cycle = None
            if _has_length(cycle):
                self._head = bytes(data)
                return
        self._transport.write(data)

    def close(self) -> None:
        if self._head and not self._transport.is_closing():  # the app ended without its body
            self._transport.write(self._head)
        self._head, self._cycle = b"", None
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


def _has_length(cycle: RequestResponseCycle) -> bool:
    # uvicorn writes every body message of such an answer, an empty one too; a HEAD request's
    # body messages write nothing, so its head is never held.
    return cycle.expected_content_length > 0 and not cycle.chunked_encoding and cycle.scope["method"] != "HEAD"


class DrainingServer(uvicorn.Server):
    """A uvicorn server that tells the app it drains (readiness answers 503) as soon as SIGTERM or
    SIGINT arrives; uvicorn then stops accepting connections and lets those in flight finish
    within `timeout_graceful_shutdown`."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            logger.info("ready: taking requests at http://%s:%d", self.config.host, self.config.port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        mark_draining(self.config.loaded_app if self.config.loaded else None)
        super().handle_exit(sig, frame)


class DrainingSupervisor(Multiprocess):
    """uvicorn's `--workers` supervisor, which also lets go of the listening socket as soon as it
    stops: the workers close theirs, and new connections are then refused rather than left
    waiting in the backlog of a socket nobody accepts on."""

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    def handle_hup(self) -> None:
        """Passes SIGHUP on to every worker, each of which re-reads its config in place; uvicorn's
        own answer, replacing every worker, would cut every stream in flight."""
        for process in self.processes:
            pid = process.pid
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)


def exit_quietly_after_sigterm() -> None:
    """uvicorn re-raises the signal that stopped it once it has shut down gracefully; with this
    handler in place beforehand, a drained SIGTERM ends the process with status 0."""

    def exit_zero(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, exit_zero)


def mark_draining(app: Any) -> None:
    """Sets the draining flag of the proxykit app inside `app` (uvicorn may wrap it)."""
    for _ in range(8):  # uvicorn's wrappers (message logger, proxy headers) keep the app as `.app`
        if app is None:
            return
        resources = getattr(getattr(app, "state", None), "resources", None)
        if resources is not None:
            resources.draining = True
            return
        app = getattr(app, "app", None)


def drain_on_exit_signals(app: Any) -> None:
    """In a `--workers` process, where uvicorn makes the server: wraps the SIGTERM and SIGINT
    handlers it installed, so the app drains first. Called while the app loads."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if callable(handler):
            def drain_then(signum: int, frame: FrameType | None, handler: Any = handler) -> None:
                mark_draining(app)
                handler(signum, frame)

            signal.signal(sig, drain_then)
