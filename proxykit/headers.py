"""Header filtering in both directions (RFC 9110 section 7.6.1: hop-by-hop fields end at each hop)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

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


def _named_by_connection(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


def upstream_headers(client_headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The client's headers as they may go upstream (as str pairs, for httpx)."""
    headers = list(client_headers)
    drop = _NOT_UPSTREAM | _named_by_connection(headers)
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers if name.lower() not in drop
    ]


def downstream_headers(upstream: Iterable[tuple[bytes, bytes]], *, keep_length: bool) -> RawHeaders:
    """The upstream's headers as they may go to the client; `x-request-id` is renamed, not lost."""
    headers = list(upstream)
    drop = _NOT_DOWNSTREAM | _named_by_connection(headers)
    result: RawHeaders = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-request-id":
            result.append((b"x-upstream-request-id", value))
        elif lowered not in drop or (keep_length and lowered == b"content-length"):
            result.append((lowered, value))
    return result
