"""Gives each request an id, returns it with the response, and writes one log line at the end."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.context import RequestContext, ensure_context
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
                self._access_line(scope, ctx)
            request_id_var.reset(token)

    @staticmethod
    def _access_line(scope: Scope, ctx: RequestContext) -> None:
        fields = _access_fields(scope, ctx)
        ttfb = "-" if fields["ttfb_ms"] is None else f"{fields['ttfb_ms']}ms"
        logger.info(
            "%s %s model=%s client=%s key=%s status=%s attempts=%s ttfb=%s duration=%sms",
            fields["method"], fields["path"], fields["model"], fields["client"], fields["key"], fields["status"],
            fields["attempts"], ttfb, fields["duration_ms"], extra={"fields": fields},
        )


def _access_fields(scope: Scope, ctx: RequestContext) -> dict[str, Any]:
    return {
        "method": scope["method"], "path": scope["path"], "model": _model_for_log(ctx), "client": ctx.client,
        "key": ctx.key_alias or "-", "status": 499 if ctx.disconnected else ctx.status,
        "attempts": ctx.attempts_header() or "-",
        "ttfb_ms": None if ctx.ttfb is None else round(ctx.ttfb * 1000, 1),
        "duration_ms": round((time.perf_counter() - ctx.started) * 1000, 1),
    }


def _model_for_log(ctx: RequestContext) -> str:
    """The configured model, or what the client asked for when it is unknown (quoted and cut
    short: it is the client's string)."""
    asked = (ctx.payload or {}).get("model")
    if ctx.model != "unknown" or not isinstance(asked, str):
        return ctx.model
    return f"unknown(asked {asked[:64]!r})"
