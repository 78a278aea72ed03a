"""The fastest honest upstream for benchmarks: a fixed ~1 KB chat completion, or, for
`"stream": true`, MOCK_EVENTS server-sent events MOCK_GAP_MS apart (chunked; a write per event,
the last one together with the end); either after MOCK_LATENCY_MS (default 0: at once).

    MOCK_LATENCY_MS=50 MOCK_EVENTS=50 MOCK_GAP_MS=2 python -m tests.benchmarks.mock_upstream --port 8001

A bare asyncio protocol on uvloop rather than an ASGI app: it shares its core with the load
generator. Under uvicorn it cost ~33 µs an event (now ~12): at 64 concurrent streams that core
was full, events left late, and even a direct connection read 1.04 events at a time (now ~1.02).
It held wrk back too: direct 8,800 requests/s at 64 concurrent, now ~35,000.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import cast

import httptools
import uvloop

_CONTENT = "proxykit benchmark reply " * 32
BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": _CONTENT}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 200, "total_tokens": 210},
}).encode()
EVENTS = int(os.environ.get("MOCK_EVENTS", "50"))
GAP = float(os.environ.get("MOCK_GAP_MS", "2")) / 1000
LATENCY = float(os.environ.get("MOCK_LATENCY_MS", "0")) / 1000
CHUNK = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
                    "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
USAGE = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
                    "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": EVENTS, "total_tokens": 60}})

PLAIN_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(BODY)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


EVENT = _chunked(f"data: {CHUNK}\n\n".encode())
TAIL = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
TAIL_WITH_USAGE = _chunked(f"data: {USAGE}\n\ndata: [DONE]\n\n".encode()) + b"0\r\n\r\n"


class MockConnection(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive). The load never
    pipelines, so a request that arrives during an answer is not held back for it."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None  # the next step of the answer in progress
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, keep_alive = b"".join(self.body), self.parser.should_keep_alive()
        if LATENCY:
            self.timer = self.loop.call_later(LATENCY, self.answer, body, keep_alive)
        else:
            self.answer(body, keep_alive)

    def answer(self, body: bytes, keep_alive: bool) -> None:
        connection = b"\r\n" if keep_alive else b"connection: close\r\n\r\n"
        if b'"stream": true' not in body and b'"stream":true' not in body:
            self.write(PLAIN_HEAD + connection + BODY, keep_alive)
            return
        self.write(STREAM_HEAD + connection, True)
        self.next_event(0, TAIL_WITH_USAGE if b"include_usage" in body else TAIL, keep_alive)

    def next_event(self, sent: int, tail: bytes, keep_alive: bool) -> None:
        if sent + 1 < EVENTS:
            self.write(EVENT, True)
            self.timer = self.loop.call_later(GAP, self.next_event, sent + 1, tail, keep_alive)
        else:
            self.timer = None
            self.write(EVENT + tail, keep_alive)  # the last event and the end of the stream

    def write(self, data: bytes, keep_open: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if not keep_open:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(MockConnection, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
