"""Streaming load: many clients each reading a server-sent-event stream over its own connection.

The client is a bare asyncio protocol, so one `data_received` is one socket read: events per read
is 1.0 when nothing was coalesced on the way, by the proxy or by a client too slow to keep up.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import cast

from tests.benchmarks.processes import CLIENT_KEY, Headers

_BODY = json.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hello"}]}).encode()


@dataclass
class Stream:
    first_event: float  # seconds from the request to the first event
    total: float  # seconds from the request to the end of the response
    largest_gap: float  # seconds between two reads that brought events
    events: int
    reads: int  # socket reads that brought at least one event
    done: bool  # ended with [DONE]: the client got the whole stream


class _StreamReader(asyncio.Protocol):
    def __init__(self, request: bytes, finished: asyncio.Future[None]) -> None:
        self.request, self.finished = request, finished
        self.started = time.perf_counter()
        self.arrivals: list[float] = []
        self.events = self.reads = 0
        self.head = b""  # the status line, until it is in
        self.tail = b""  # the end of the last read, to spot [DONE] split across two
        self.ended_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.request)  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if len(self.head) < 12:
            self.head += data[:12]
        count = data.count(b"data: {")
        if count:
            self.arrivals.append(now)
            self.events += count
            self.reads += 1
        self.tail = (self.tail + data)[-64:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended_at = time.perf_counter()
        if not self.finished.done():
            self.finished.set_result(None)

    def result(self) -> Stream | None:
        if not self.head.startswith(b"HTTP/1.1 200") or not self.arrivals:
            return None
        gaps = [later - earlier for earlier, later in itertools.pairwise(self.arrivals)]
        return Stream(self.arrivals[0] - self.started, self.ended_at - self.started, max(gaps, default=0.0),
                      self.events, self.reads, b"data: [DONE]" in self.tail)


async def one_stream(host: str, port: int, headers: Headers = (), timeout: float = 120.0) -> Stream | None:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {CLIENT_KEY}\r\n{extra}content-length: {len(_BODY)}\r\nconnection: close\r\n\r\n"
    ).encode() + _BODY
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    try:
        transport, reader = await loop.create_connection(lambda: _StreamReader(request, finished), host, port)
    except OSError:
        return None
    try:
        await asyncio.wait_for(finished, timeout)
    except TimeoutError:
        return None
    finally:
        transport.close()
    return reader.result()


async def load(url: str, concurrency: int, per_client: int, headers: Headers = ()) -> list[Stream | None]:
    """`concurrency` clients, each reading `per_client` streams one after another."""
    host, _, port = url.removeprefix("http://").partition(":")

    async def client() -> list[Stream | None]:
        return [await one_stream(host, int(port), headers) for _ in range(per_client)]

    batches = await asyncio.gather(*(client() for _ in range(concurrency)))
    return [stream for batch in batches for stream in batch]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
