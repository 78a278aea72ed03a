"""An upstream that answers by the key it is called with: one behaviour per key."""

from __future__ import annotations

import json
from collections import Counter

import anyio
from starlette.types import Receive, Scope, Send

from tests.upstreams import SSE_HEADERS, event, read_body

JSON = (b"content-type", b"application/json")


class KeyedUpstream:
    """`behaviours` maps an upstream key to one of: ok, 429, 401, 500, 500-once, dry, stream-break.

    Every call is counted per key in `calls`, and `models` keeps the model each call asked for.
    """

    def __init__(self, behaviours: dict[str, str], *, retry_after: int = 30) -> None:
        self.behaviours = behaviours
        self.retry_after = retry_after
        self.calls: Counter[str] = Counter()
        self.models: list[str] = []
        self.first_call = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        key = dict(scope["headers"]).get(b"authorization", b"").decode().removeprefix("Bearer ")
        self.calls[key] += 1
        self.first_call.set()
        if scope["path"].endswith("/models"):  # the recovery probe
            ok = self.behaviours.get(key) != "401"
            await _answer(send, 200 if ok else 401, b'{"object": "list", "data": []}')
            return
        self.models.append(json.loads(body)["model"])
        behaviour = self.behaviours.get(key, "ok")
        if (behaviour == "500-once" and self.calls[key] == 1) or behaviour == "500":
            await _answer(send, 500, b'{"error": {"message": "upstream broke"}}')
        elif behaviour == "429":
            await _answer(send, 429, b'{"error": {"message": "slow down"}}',
                          [(b"retry-after", str(self.retry_after).encode())])
        elif behaviour == "401":
            await _answer(send, 401, b'{"error": {"message": "bad key"}}')
        elif behaviour == "dry":
            await _answer(send, 200, b'{"ok": true}', [
                (b"x-ratelimit-remaining-requests", b"0"), (b"x-ratelimit-reset-requests", b"20s")])
        elif behaviour == "stream-break":
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": event(0), "more_body": True})
            raise RuntimeError("stream broke (expected by the test)")
        else:
            await _answer(send, 200, json.dumps({"ok": True, "key_suffix": key[-4:]}).encode())


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [JSON, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
