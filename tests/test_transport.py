"""The aiohttp transport under httpx: errors mapped, connections given back or closed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from proxykit import AiohttpTransport
from tests.conftest import serve
from tests.upstreams import Records, WatchesDisconnect

pytestmark = pytest.mark.anyio


async def test_refused_connection_is_an_httpx_connect_error() -> None:
    async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("http://127.0.0.1:9/")


async def test_aiohttp_adds_no_headers_of_its_own() -> None:
    upstream = Records()
    async with serve(upstream, lifespan="off") as url:
        transport = AiohttpTransport()
        request = httpx.Request("POST", url, headers={"x-a": "1"}, content=b"payload")
        response = await transport.handle_async_request(request)
        await response.aread()
        await transport.aclose()
    assert response.json() == {"ok": True}
    sent = upstream.headers[0]
    assert sent["x-a"] == "1"
    # An Accept-Encoding the client never sent would get it a compressed body it cannot read.
    assert "accept-encoding" not in sent
    assert "user-agent" not in sent


async def test_a_streamed_upload_arrives_whole() -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b'{"model": ', b'"m", ', b'"n": 1}'):
            yield part

    upstream = Records()
    async with serve(upstream, lifespan="off") as url:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            response = await client.post(url, content=parts())
    assert response.status_code == 200
    assert upstream.bodies == [b'{"model": "m", "n": 1}']
    assert upstream.headers[0].get("transfer-encoding") == "chunked"  # sent as it came, not read first


async def test_connection_is_reused_after_a_full_read() -> None:
    upstream = Records()
    async with serve(upstream, lifespan="off") as url:
        transport = AiohttpTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                await client.get(url)
            session = transport._session
            assert session is not None
            assert len(session.connector._conns) == 1  # type: ignore[union-attr]


async def test_closing_a_half_read_response_closes_its_connection() -> None:
    upstream = WatchesDisconnect(events_first=1)
    async with serve(upstream, lifespan="off") as url:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            async with client.stream("POST", url, content=b"{}") as response:
                async for _ in response.aiter_raw():
                    break
            with anyio.fail_after(2):
                await upstream.disconnected.wait()
