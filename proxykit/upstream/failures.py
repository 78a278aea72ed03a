"""Every error an upstream call can raise, decided once, in the style of httpcore's
`map_exceptions`: httpx's errors (which proxykit's own client raises too) become proxykit's.

    raise map_httpx_error(exc) from None
"""

from __future__ import annotations

from typing import Final

import httpx

from proxykit.errors import ProxyError, UpstreamBadResponse, UpstreamError, UpstreamTimeout
from proxykit.upstream.http1.response import MalformedResponse

# The first matching row wins, so subclasses come before their bases (ConnectTimeout is a
# TimeoutException, MalformedResponse a RemoteProtocolError).
HTTPX_ERRORS: Final[tuple[tuple[type[httpx.HTTPError], type[ProxyError], str], ...]] = (
    (httpx.ConnectTimeout, UpstreamError, "the upstream could not be reached in time"),
    (httpx.ConnectError, UpstreamError, "the upstream could not be reached"),
    (httpx.TimeoutException, UpstreamTimeout, "the upstream did not answer in time"),
    (MalformedResponse, UpstreamBadResponse, "the upstream's answer was not valid HTTP"),
    (httpx.RemoteProtocolError, UpstreamError, "the upstream broke the connection"),
    (httpx.TransportError, UpstreamError, "the upstream connection failed"),
    (httpx.HTTPError, UpstreamError, "the upstream request failed"),
)


def map_httpx_error(exc: httpx.HTTPError) -> ProxyError:
    for httpx_class, error_class, message in HTTPX_ERRORS:
        if isinstance(exc, httpx_class):
            return error_class(message)
    raise AssertionError("unreachable: httpx.HTTPError is the last row")  # pragma: no cover
