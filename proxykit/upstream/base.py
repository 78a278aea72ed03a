"""What the forwarder needs of an upstream call, over any httpx transport or straight over proxykit's client.

    upstream = upstream_for(transport)
    response = await upstream.open("POST", url, headers, body, timeouts)
    while chunk := await response.read_chunk(): ...
    await response.aclose()

Any httpx transport works (tests plug respx in). proxykit's own transports are called without
building httpx Request and Response objects: on the hot path those cost a fifth of the proxy's
CPU. All raise httpx's errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol

import httpx

from proxykit.upstream.transport import AiohttpTransport, Http1Transport


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """As the upstream sent them, names in any case."""

    def header(self, name: str) -> str | None:
        """The value of one header, any case of its name."""

    async def read_chunk(self) -> bytes:
        """The next piece of the raw body (never decompressed) as it arrived, a socket read at a
        time; b"" once it has all been read. A method, not an async generator: a generator left
        unfinished (the last chunk is known from `at_eof`) is closed by the event loop through
        a thread-safe wake-up and a task of its own, two system calls per request."""

    def at_eof(self) -> bool:
        """True once the whole body has been read: the chunk just read was the last."""

    async def aclose(self) -> None:
        """Gives the connection back after a complete body, closes it otherwise."""


class Upstream(Protocol):
    async def open(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes,
        timeouts: Mapping[str, float | None],
    ) -> UpstreamResponse:
        """Sends a request and returns once the response headers are in. `headers` carry neither
        `host` nor `content-length`."""


def upstream_for(transport: httpx.AsyncBaseTransport) -> Upstream:
    if isinstance(transport, Http1Transport):
        return transport.client
    return transport if isinstance(transport, AiohttpTransport) else HttpxUpstream(transport)


class HttpxUpstream:
    """Any httpx transport as an `Upstream`: respx's mock, `httpx.ASGITransport`, httpx's own pool."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def open(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes,
        timeouts: Mapping[str, float | None],
    ) -> UpstreamResponse:
        request = httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": dict(timeouts)})
        return _HttpxResponse(await self.transport.handle_async_request(request))


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.raw_headers = response.headers.raw
        self._chunks: AsyncIterator[bytes] = response.aiter_raw()

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    async def read_chunk(self) -> bytes:
        async for chunk in self._chunks:
            if chunk:
                return chunk
        return b""

    def at_eof(self) -> bool:
        return False  # not known before the iterator ends

    async def aclose(self) -> None:
        await self._response.aclose()
