"""Both transports under httpx (proxykit's own client, the default, and aiohttp): errors mapped,
no headers of their own, uploads streamed, connections given back or closed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from proxykit import AiohttpTransport, Http1Transport
from tests.conftest import serve
from tests.upstreams import Records, WatchesDisconnect

pytestmark = pytest.mark.anyio

TRANSPORTS = pytest.mark.parametrize("make_transport", [
    pytest.param(Http1Transport, id="http1"),
    pytest.param(AiohttpTransport, id="aiohttp"),
])
Transport = type[Http1Transport] | type[AiohttpTransport]


@TRANSPORTS
async def test_refused_connection_is_an_httpx_connect_error(make_transport: Transport) -> None:
    async with httpx.AsyncClient(transport=make_transport()) as client:
        with pytest.raises(httpx.ConnectError) as raised:
            await client.get("http://127.0.0.1:9/")
    assert "127.0.0.1" not in str(raised.value) and ":9" not in str(raised.value)  # errors never name the upstream


@TRANSPORTS
async def test_no_headers_of_its_own(make_transport: Transport) -> None:
    upstream = Records()
    async with serve(upstream, lifespan="off") as url:
        transport = make_transport()
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


@TRANSPORTS
async def test_a_streamed_upload_arrives_whole(make_transport: Transport) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b'{"model": ', b'"m", ', b'"n": 1}'):
            yield part

    upstream = Records()
    async with serve(upstream, lifespan="off") as url:
        async with httpx.AsyncClient(transport=make_transport()) as client:
            response = await client.post(url, content=parts())
    assert response.status_code == 200
    assert upstream.bodies == [b'{"model": "m", "n": 1}']
    assert upstream.headers[0].get("transfer-encoding") == "chunked"  # sent as it came, not read first


async def test_aiohttp_reuses_its_connection_after_a_full_read() -> None:
    client_ports: list[int] = []

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        client_ports.append(scope["client"][1])  # one connection, one client port
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async with serve(upstream, lifespan="off") as url:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            for _ in range(3):
                await client.get(url)
    assert len(client_ports) == 3 and len(set(client_ports)) == 1


@TRANSPORTS
async def test_closing_a_half_read_response_closes_its_connection(make_transport: Transport) -> None:
    upstream = WatchesDisconnect(events_first=1)
    async with serve(upstream, lifespan="off") as url:
        async with httpx.AsyncClient(transport=make_transport()) as client:
            async with client.stream("POST", url, content=b"{}") as response:
                async for _ in response.aiter_raw():
                    break
            with anyio.fail_after(2):
                await upstream.disconnected.wait()
