"""httpx transports over proxykit's own HTTP/1.1 client (the default) and over aiohttp.

httpx stays proxykit's client interface (requests, responses, and the transport seam that tests
plug respx into), but its own pool cannot carry an LLM gateway's load; aiohttp's can, and
proxykit's own client (`proxykit.upstream.http1`) costs less again per request. The benchmark's
README has the figures.

    client = httpx.AsyncClient(transport=Http1Transport(max_connections=1000))
    client = httpx.AsyncClient(transport=AiohttpTransport(max_connections=1000))
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Final

import aiohttp
import httpx
import yarl

from proxykit.upstream.http1.client import Http1Client
from proxykit.upstream.http1.response import Http1Response
from proxykit.upstream.proxy import ProxyRules

# aiohttp's errors as httpx's, most specific first (ConnectionTimeoutError is a ServerTimeoutError,
# ClientConnectorError a ClientOSError). httpx's own errors pass through unchanged.
_AIOHTTP_ERRORS: Final[tuple[tuple[type[BaseException], type[httpx.TransportError]], ...]] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.RemoteProtocolError),
)


def _as_httpx_error(exc: aiohttp.ClientError) -> httpx.TransportError:
    for aiohttp_class, httpx_class in _AIOHTTP_ERRORS:
        if isinstance(exc, aiohttp_class):
            # The message is the class name only: aiohttp's text names the upstream host.
            return httpx_class(type(exc).__name__)
    raise AssertionError("unreachable: the last row matches every ClientError")  # pragma: no cover


class AiohttpResponse:
    """An aiohttp response as `proxykit.upstream.UpstreamResponse`: raw headers and raw chunks."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.raw_headers = response.raw_headers
        self.reason = response.reason or ""

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def read_chunk(self) -> bytes:
        try:
            # readany: a chunk as the socket delivered it, never waiting to fill a buffer.
            return await self._response.content.readany()
        except aiohttp.ClientError as exc:
            raise _as_httpx_error(exc) from exc

    def at_eof(self) -> bool:
        return self._response.content.at_eof()

    async def aclose(self) -> None:
        # Both are synchronous, so a cancelled forwarding task cannot skip them half way: a fully
        # read response goes back to the pool, a cut one closes its connection.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: AiohttpResponse | Http1Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self._response.read_chunk():
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


def _as_httpx_response(request: httpx.Request, response: AiohttpResponse | Http1Response) -> httpx.Response:
    return httpx.Response(
        status_code=response.status,
        headers=response.raw_headers,
        stream=_ResponseStream(response),
        request=request,
        extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason.encode("latin-1")},
    )


def _body_of(request: httpx.Request) -> bytes | AsyncIterable[bytes]:
    try:
        return request.content
    except httpx.RequestNotRead:
        return request.stream  # type: ignore[return-value]  # a streamed upload stays streamed


_SET_BY_CLIENT: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})


class Http1Transport(httpx.AsyncBaseTransport):
    """Sends httpx requests through proxykit's own HTTP/1.1 client (`proxykit.upstream.http1.client`), the default.

    Bodies pass as raw bytes both ways: no decompression, no headers of its own beyond `host`
    and the body's framing.
    """

    def __init__(
        self, *, max_connections: int = 1000, keepalive_expiry: float = 30.0, ssl_context: ssl.SSLContext | None = None,
        proxies: ProxyRules | None = None,
    ) -> None:
        self.client = Http1Client(
            max_connections=max_connections, keepalive_expiry=keepalive_expiry, ssl_context=ssl_context,
            proxies=proxies,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # The client sets the host and the framing itself, from the URL and the body.
        headers = [(name, value) for name, value in request.headers.raw if name.lower() not in _SET_BY_CLIENT]
        response = await self.client.open(
            request.method, str(request.url), headers, _body_of(request), request.extensions.get("timeout", {}),
        )
        return _as_httpx_response(request, response)

    async def aclose(self) -> None:
        await self.client.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests through one `aiohttp.ClientSession`, created on first use: for a host
    that prefers aiohttp's client to proxykit's own.

    Bodies pass as raw bytes both ways: no decompression, no added Accept-Encoding.
    """

    def __init__(self, *, max_connections: int = 1000, keepalive_expiry: float = 30.0) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=self._keepalive_expiry,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            # Without these aiohttp adds its own Accept-Encoding, and an upstream would then
            # compress for a client that never asked for it.
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would leak cookies across users
            trust_env=False,
        )

    async def open(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes | AsyncIterable[bytes],
        timeouts: Mapping[str, float | None],
    ) -> AiohttpResponse:
        """The request sent straight through aiohttp: what the forwarder calls (`proxykit.upstream.base`)."""
        session = self._session
        if session is None:
            session = self._session = self._open_session()
        named = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        try:
            response = await session.request(
                method, _parsed_url(url), headers=named, data=body or None, allow_redirects=False,
                timeout=_client_timeout(timeouts.get("connect"), timeouts.get("read")),
            )
        except aiohttp.ClientError as exc:
            raise _as_httpx_error(exc) from exc
        return AiohttpResponse(response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # aiohttp frames a streamed body itself, and refuses one that already says it is chunked.
        headers = [(name, value) for name, value in request.headers.raw if name.lower() != b"transfer-encoding"]
        timeouts = request.extensions.get("timeout", {})
        response = await self.open(request.method, str(request.url), headers, _body_of(request), timeouts)
        return _as_httpx_response(request, response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@functools.lru_cache(maxsize=1024)
def _parsed_url(url: str) -> yarl.URL:
    # A gateway sends to the same few URLs all day; bounded, since clients choose paths and queries.
    return yarl.URL(url)


@functools.lru_cache(maxsize=16)
def _client_timeout(connect: float | None, read: float | None) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)
