"""Client authentication: a configured key as `Authorization: Bearer KEY` or `X-API-Key: KEY`."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit._utils import route_path
from proxykit.config import ClientKey
from proxykit.context import ensure_context
from proxykit.errors import InvalidApiKey, send_error


class AuthMiddleware:
    """Answers 401 `invalid_api_key` unless the request carries one of `keys`; records the key's
    *name* and model allow-list in the request context for the inner layers.

        Middleware(AuthMiddleware, keys=config.auth.keys, open_paths={"/health"})
    """

    def __init__(self, app: ASGIApp, *, keys: Iterable[ClientKey], open_paths: Iterable[str] = ()) -> None:
        self.app = app
        # Looked up by digest, then confirmed with compare_digest: O(1) in the number of keys, and
        # the time taken does not reveal how much of a guessed key was right.
        self.keys = {_digest(key.key): key for key in keys}
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        client = self.keys.get(_digest(presented)) if presented else None
        if client is None or not hmac.compare_digest(client.key.encode(), presented.encode()):
            error = InvalidApiKey(
                "missing API key: send it as 'Authorization: Bearer KEY'" if not presented
                else "invalid API key"
            )
            await send_error(error, scope, receive, send)
            return
        ctx = ensure_context(scope)
        ctx.client = client.name
        ctx.allowed_models = client.models
        await self.app(scope, receive, send)


def _presented_key(scope: Scope) -> str:
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
        elif name == b"x-api-key":
            return value.decode("latin-1").strip()
    return ""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
