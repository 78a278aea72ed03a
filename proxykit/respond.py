"""proxykit's own answers over ASGI: an error as OpenAI-shaped JSON.

    await send_error(ModelNotFound("the model 'x' does not exist"), scope, receive, send)
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from proxykit.context import ensure_context
from proxykit.errors import ProxyError


async def send_error(exc: ProxyError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a request with `exc` as an OpenAI-shaped JSON error."""
    await send_error_to(send, exc, ensure_context(scope).request_id)


async def send_error_to(send: Send, exc: ProxyError, request_id: str) -> None:
    body = exc.body(request_id)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in exc.headers.items()),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
