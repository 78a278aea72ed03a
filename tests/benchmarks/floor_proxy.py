"""The bare floor: the thinnest pure-ASGI forwarder on raw aiohttp, for comparison only.

    FLOOR_UPSTREAM=http://127.0.0.1:8001 python -m uvicorn tests.benchmarks.floor_proxy:app --port 4002
"""

from __future__ import annotations

import os

import aiohttp
from starlette.types import Receive, Scope, Send

from tests.upstreams import read_body

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:8001")
_session: aiohttp.ClientSession | None = None


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    global _session
    if scope["type"] != "http":
        return
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
        )
    body = await read_body(receive)
    headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k not in (b"host", b"content-length")]
    async with _session.request(scope["method"], UPSTREAM + scope["path"], headers=headers, data=body) as response:
        out = [(k, v) for k, v in response.raw_headers if k.lower() not in (b"transfer-encoding", b"connection")]
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
