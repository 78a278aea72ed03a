"""Small ASGI upstreams for tests that need a real server: each shows one behaviour."""

from __future__ import annotations

import json

import anyio
from starlette.types import Receive, Scope, Send

SSE_HEADERS = [(b"content-type", b"text/event-stream")]


def event(n: int) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": f"piece-{n} "}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def read_body(receive: Receive) -> bytes:
    """The whole request body of an ASGI request."""
    body = b""
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body"):
            return body


class GatedStream:
    """Sends event n only after the test called `release()` for it: a proxy that held chunks back
    would leave the test waiting forever for event 0."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.gates = [anyio.Event() for _ in range(events + 1)]  # the last gate holds [DONE]

    def release(self, n: int) -> None:
        self.gates[n].set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for n in range(self.events):
            await self.gates[n].wait()
            await send({"type": "http.response.body", "body": event(n), "more_body": True})
        await self.gates[self.events].wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


class WatchesDisconnect:
    """Sends `events_first` events (none: not even headers), then waits for the proxy to hang up."""

    def __init__(self, events_first: int) -> None:
        self.events_first = events_first
        self.requested = anyio.Event()
        self.disconnected = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        self.requested.set()
        if self.events_first:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            for n in range(self.events_first):
                await send({"type": "http.response.body", "body": event(n), "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()


class Silent:
    """Never answers: holds the request until the connection goes away."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        while (await receive())["type"] != "http.disconnect":
            pass


class BreaksOff:
    """Starts a stream, sends `events` events, then fails: the server cuts the connection."""

    def __init__(self, events: int, *, partial: bytes = b"") -> None:
        self.events = events
        self.partial = partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for n in range(self.events):
            await send({"type": "http.response.body", "body": event(n), "more_body": True})
        if self.partial:
            await send({"type": "http.response.body", "body": self.partial, "more_body": True})
        await anyio.sleep(0.05)
        raise RuntimeError("upstream crashed mid-stream (expected by the test)")


class Records:
    """Answers 200 with a small JSON body and keeps every request's headers and body."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.bodies.append(await read_body(receive))
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        body = b'{"ok": true}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
