"""The fastest honest upstream for benchmarks: a fixed ~1 KB chat completion, answered at once.

    python -m uvicorn tests.benchmarks.mock_upstream:app --port 8001 --log-level warning
"""

from __future__ import annotations

import json

from starlette.types import Receive, Scope, Send

_CONTENT = "proxykit benchmark reply " * 32
BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": _CONTENT}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 200, "total_tokens": 210},
}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
