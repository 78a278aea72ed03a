"""Header filtering in both directions (RFC 9110 section 7.6.1: hop-by-hop fields end at each hop)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from starlette.types import Message, Send

from proxykit.sends import step_aside

RawHeaders = list[tuple[bytes, bytes]]

HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Never upstream: the host is the upstream's, the credentials are the client's (the upstream key
# replaces them), and the length is recomputed after the model is rewritten.
_NOT_UPSTREAM: Final = HOP_BY_HOP | {
    b"host", b"authorization", b"x-api-key", b"api-key", b"content-length", b"x-request-id", b"cookie",
}
# Never back to the client: uvicorn writes its own `server` and `date`, and two of each break
# strict HTTP parsers.
_NOT_DOWNSTREAM: Final = HOP_BY_HOP | {b"server", b"date", b"content-length"}


def _named_by_connection(lowered: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for name, value in lowered:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


def upstream_headers(client_headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """The client's headers as they may go upstream. ASGI servers give request header names in
    lowercase."""
    kept = []
    connections = []  # a client may send several Connection headers: each names hop-by-hop fields
    for name, value in client_headers:
        if name in _NOT_UPSTREAM:
            if name == b"connection":
                connections.append((name, value))
            continue
        kept.append((name, value))
    if connections:
        named = _named_by_connection(connections)
        kept = [(name, value) for name, value in kept if name not in named]
    return kept


def downstream_headers(upstream: Iterable[tuple[bytes, bytes]], *, keep_length: bool) -> RawHeaders:
    """The upstream's headers as they may go to the client; `x-request-id` is renamed, not lost."""
    lowered = [(name.lower(), value) for name, value in upstream]
    drop = _NOT_DOWNSTREAM | _named_by_connection(lowered)
    if keep_length:
        drop = drop - {b"content-length"}
    return [
        (b"x-upstream-request-id", value) if name == b"x-request-id" else (name, value)
        for name, value in lowered if name not in drop
    ]


def set_response_headers(start: Message, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Sets `headers` on an `http.response.start` message, replacing any of the same names (ASGI
    header names are lowercase). A plain list rebuild: Starlette's MutableHeaders cost a few
    percent of the proxy's CPU per request."""
    names = {name for name, _ in headers}
    start["headers"] = [pair for pair in start.get("headers", ()) if pair[0] not in names] + list(headers)


def adding_headers(send: Send, headers: Sequence[tuple[bytes, bytes]]) -> Send:
    """A `send` that sets `headers` on the response's start and steps aside for its body."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            set_response_headers(message, headers)
        await send(message)

    step_aside(send_with_headers, send)  # the start is all it changes
    return send_with_headers
