"""Client authentication: a configured key as `Authorization: Bearer KEY` or `X-API-Key: KEY`."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit.config import ClientKey
from proxykit.context import ensure_context
from proxykit.errors import InvalidApiKey
from proxykit.paths import route_path
from proxykit.respond import send_error


class AuthMiddleware:
    """Answers 401 `invalid_api_key` unless the request carries one of `keys`; records the key's
    *name* and model allow-list in the request context for the inner layers.

        Middleware(AuthMiddleware, keys=config.auth.keys, open_paths={"/health"})
    """

    def __init__(self, app: ASGIApp, *, keys: Iterable[ClientKey], open_paths: Iterable[str] = ()) -> None:
        self.app = app
        # A dict lookup is O(1) in the number of keys, and its time does not reveal how much of a
        # guessed key was right: strings are compared only once their hashes match, and str
        # hashes are keyed with a random secret per process (SipHash), so a guess cannot aim at one.
        self.keys = {key.key: key for key in keys}
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        client = self.keys.get(presented) if presented else None
        if client is None:
            error = InvalidApiKey(
                "missing API key: send it as 'Authorization: Bearer KEY'" if not presented
                else "invalid API key"
            )
            await send_error(error, scope, receive, send)
            return
        ctx = ensure_context(scope)
        ctx.client = client.name
        ctx.allowed_models = client.models
        ctx.admin = client.admin
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

