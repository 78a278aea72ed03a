"""Layers step aside for the rest of a response body; a layer that is not proxykit's never does."""

from __future__ import annotations

import httpx
import pytest
import respx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.config.reader import config_from_dict
from proxykit.forward import Forwarder
from proxykit.middleware.metrics import MetricsMiddleware
from proxykit.middleware.request_id import RequestIdMiddleware
from proxykit.middleware.retry import RetryMiddleware, RetryPolicy
from proxykit.middleware.rotation import KeyRotationMiddleware
from proxykit.resources import Resources
from tests.conftest import CHAT, make_config, streamed

pytestmark = pytest.mark.anyio

CHUNKS = [b'data: {"n": "one"}\n\n', b'data: {"n": "two"}\n\n', b'data: {"n": "three"}\n\n', b"data: [DONE]\n\n"]


class Shout:
    """A host's own layer that changes every body chunk (upper case), and counts them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.chunks = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def shout(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.chunks += 1
                message = {**message, "body": message["body"].upper()}
            await send(message)

        await self.app(scope, receive, shout)


@pytest.mark.parametrize("shout_at", ["outside", "between", "inside"])
async def test_every_chunk_passes_a_layer_that_is_not_proxykits(shout_at: str) -> None:
    router = respx.MockRouter(base_url="http://upstream.test/v1", using=None)
    router.post("/chat/completions").mock(
        side_effect=lambda request: streamed(200, *CHUNKS, headers={"content-type": "text/event-stream"}))
    resources = Resources(config_from_dict(make_config()), transport=httpx.MockTransport(router.async_handler))
    assert resources.metrics is not None
    app: ASGIApp = Forwarder(resources)
    shout = Shout(app) if shout_at == "inside" else None
    app = shout or app
    app = KeyRotationMiddleware(app, pool=resources.keys, max_body_bytes=1_000_000)
    app = RetryMiddleware(app, policy=RetryPolicy(), max_body_bytes=1_000_000)
    if shout_at == "between":
        app = shout = Shout(app)
    app = MetricsMiddleware(app, metrics=resources.metrics)
    app = RequestIdMiddleware(app)
    if shout_at == "outside":
        app = shout = Shout(app)
    await resources.open()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test") as client:
            response = await client.post("/chat/completions", json=CHAT)  # as under the /v1 mount
    finally:
        await resources.aclose()
    assert response.status_code == 200
    assert response.content == b"".join(CHUNKS).upper()  # no chunk went past the host's layer
    assert shout is not None and shout.chunks == len(CHUNKS)
