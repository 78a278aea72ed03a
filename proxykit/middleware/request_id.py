"""Gives each request an id, returns it with the response, and writes one log line at the end."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.context import ensure_context
from proxykit.headers import set_response_headers
from proxykit.logs import request_id_var
from proxykit.sends import step_aside

logger = logging.getLogger("proxykit.access")


class RequestIdMiddleware:
    """The outermost layer: `x-request-id` (the client's, or a new one) and `x-proxykit-attempts`
    on every response, the id on every log record, and one access line per request.

        Middleware(RequestIdMiddleware)
    """

    def __init__(self, app: ASGIApp, *, header: str = "x-request-id") -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan and websocket pass straight through
            await self.app(scope, receive, send)
            return
        ctx = ensure_context(scope)
        token = request_id_var.set(ctx.request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
                added = [(self.header, ctx.request_id.encode("latin-1"))]
                if ctx.attempts:
                    added.append((b"x-proxykit-attempts", ctx.attempts_header().encode("latin-1")))
                set_response_headers(message, added)
            await send(message)

        step_aside(send_with_id, send)  # the start is all it changes
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if logger.isEnabledFor(logging.INFO):
                status = 499 if ctx.disconnected else ctx.status
                ttfb = "-" if ctx.ttfb is None else f"{ctx.ttfb * 1000:.1f}ms"
                logger.info(
                    "%s %s model=%s client=%s key=%s status=%s attempts=%s ttfb=%s duration=%.1fms",
                    scope["method"], scope["path"], ctx.model, ctx.client, ctx.key_alias or "-", status,
                    ctx.attempts_header() or "-", ttfb, (time.perf_counter() - ctx.started) * 1000,
                )
            request_id_var.reset(token)
