"""The fastest honest upstream for benchmarks: a fixed ~1 KB chat completion, or, for
`"stream": true`, MOCK_EVENTS server-sent events MOCK_GAP_MS apart; either after MOCK_LATENCY_MS
(default 0: at once).

    MOCK_LATENCY_MS=50 MOCK_EVENTS=50 MOCK_GAP_MS=2 python -m uvicorn tests.benchmarks.mock_upstream:app --port 8001
"""

from __future__ import annotations

import asyncio
import json
import os

from starlette.types import Receive, Scope, Send

from tests.upstreams import read_body

_CONTENT = "proxykit benchmark reply " * 32
BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": _CONTENT}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 200, "total_tokens": 210},
}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
EVENTS = int(os.environ.get("MOCK_EVENTS", "50"))
GAP = float(os.environ.get("MOCK_GAP_MS", "2")) / 1000
LATENCY = float(os.environ.get("MOCK_LATENCY_MS", "0")) / 1000
CHUNK = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
                    "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
USAGE = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
                    "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": EVENTS, "total_tokens": 60}})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    if LATENCY:
        await asyncio.sleep(LATENCY)
    if b'"stream": true' not in body and b'"stream":true' not in body:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(EVENTS):
        if i:
            await asyncio.sleep(GAP)
        await send({"type": "http.response.body", "body": f"data: {CHUNK}\n\n".encode(), "more_body": True})
    tail = (f"data: {USAGE}\n\n" if b"include_usage" in body else "") + "data: [DONE]\n\n"
    await send({"type": "http.response.body", "body": tail.encode()})
