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


RESPONSES_USAGE = {"input_tokens": 12, "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 1}}


class ResponsesApi:
    """OpenAI's Responses API, streaming: usage comes inside the response of the last event, and,
    strict as OpenAI is, a parameter it does not know (`stream_options.include_usage`) is a 400."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = json.loads(await read_body(receive))
        if "include_usage" in (request.get("stream_options") or {}):
            error = {"message": "Unknown parameter: 'stream_options.include_usage'.", "type": "invalid_request_error",
                     "param": "stream_options.include_usage", "code": "unknown_parameter"}
            json_type = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 400, "headers": json_type})
            await send({"type": "http.response.body", "body": json.dumps({"error": error}).encode()})
            return
        response = {"id": "resp_1", "object": "response", "created_at": 0, "model": request["model"],
                    "status": "in_progress", "output": [], "usage": None}
        events = [
            {"type": "response.created", "sequence_number": 0, "response": response},
            {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0,
             "content_index": 0, "delta": "Hello", "logprobs": []},
            {"type": "response.completed", "sequence_number": 2,
             "response": {**response, "status": "completed", "usage": RESPONSES_USAGE}},
        ]
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for item in events:
            body = f"event: {item['type']}\ndata: {json.dumps(item)}\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
