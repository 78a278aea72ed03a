"""A request leaves nothing for the garbage collector: everything it allocates is freed by
reference counting when it ends. One reference cycle per request (a `send` wrapper that refers to
itself was one) keeps every object reachable from it alive until a collection, and the collector
then spends its time, in pauses that show in the latency tail, on garbage that need not exist."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from proxykit import create_app
from tests.conftest import CHAT, CLIENT_KEY, make_config, serve, with_auth
from tests.upstreams import SSE_HEADERS, event, read_body

pytestmark = pytest.mark.anyio

ANSWER = {"id": "c1", "object": "chat.completion", "model": "upstream-chat",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


async def chat_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """A chat completion, or three events and [DONE] when asked to stream."""
    body = json.loads(await read_body(receive))
    if body.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for n in range(3):
            await send({"type": "http.response.body", "body": event(n), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(ANSWER).encode()})


@contextmanager
def cyclic_garbage() -> Iterator[list[Any]]:
    """Collects nothing while the block runs, then yields (in the list) every object that only a
    collection could free, of proxykit's or of the server's request cycle."""
    found: list[Any] = []
    gc.collect()
    gc.disable()
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found += [obj for obj in gc.garbage if _owned(obj)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _owned(obj: object) -> bool:
    module = getattr(obj, "__module__", None) if callable(obj) and not isinstance(obj, type) else None
    module = module or type(obj).__module__
    return module.startswith("proxykit") or type(obj).__name__ == "RequestResponseCycle"


async def test_requests_of_every_kind_leave_no_reference_cycles() -> None:
    config = with_auth(make_config(
        retry={"attempts": 2},
        cache={"enabled": True},
        store={"url": "sqlite://"},
        metrics={"enabled": True},
    ))
    config["auth"]["keys"][0].update(rpm=10_000, tpm=10_000_000)
    async with serve(chat_upstream, lifespan="off") as upstream_url:
        config["models"][0]["deployments"][0]["base_url"] = f"{upstream_url}/v1"
        async with serve(create_app(config)) as url, httpx.AsyncClient(base_url=url) as client:
            headers = {"authorization": f"Bearer {CLIENT_KEY}"}
            await client.post("/v1/chat/completions", json=CHAT, headers=headers)  # connections, first use
            with cyclic_garbage() as garbage:
                for n in range(20):
                    fresh = {**CHAT, "user": f"u{n}"}  # a cache miss
                    assert (await client.post("/v1/chat/completions", json=fresh, headers=headers)).status_code == 200
                    assert (await client.post("/v1/chat/completions", json=CHAT, headers=headers)).status_code == 200
                    streamed = await client.post("/v1/chat/completions", json={**fresh, "stream": True},
                                                 headers=headers)
                    assert streamed.text.endswith("data: [DONE]\n\n")
                    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 401
            assert sorted({type(obj).__qualname__ for obj in garbage}) == []  # the kinds, not hundreds of them
