"""Streaming, first-byte timing and disconnects through real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

import anyio
import httpx
import pytest

from proxykit import AiohttpTransport
from tests.conftest import CHAT, proxy_in_front_of
from tests.upstreams import BreaksOff, GatedStream, Silent, WatchesDisconnect, event

pytestmark = pytest.mark.anyio

STREAM = {**CHAT, "stream": True}
# The default transport, and aiohttp's: a stream is read by a task of its own either way.
TRANSPORTS = [pytest.param(lambda: None, id="http1"), pytest.param(AiohttpTransport, id="aiohttp")]


async def test_each_event_reaches_the_client_before_the_next_is_sent() -> None:
    upstream = GatedStream(events=3)
    async with proxy_in_front_of(upstream) as url, httpx.AsyncClient() as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=STREAM) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = response.aiter_raw()
            for n in range(3):
                upstream.release(n)  # the upstream sends event n only now
                with anyio.fail_after(5):  # a proxy that buffered would never deliver it
                    assert await anext(chunks) == event(n)
            upstream.release(3)
            with anyio.fail_after(5):
                assert await anext(chunks) == b"data: [DONE]\n\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_client_leaving_mid_stream_ends_the_upstream_request(
    transport: Callable[[], httpx.AsyncBaseTransport | None],
) -> None:
    upstream = WatchesDisconnect(events_first=1)
    async with proxy_in_front_of(upstream, transport=transport()) as url, httpx.AsyncClient() as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=STREAM) as response:
            async for _ in response.aiter_raw():
                break  # the first event arrived while the upstream still streams
        with anyio.fail_after(1):  # a liveness bound, not a timing assertion
            await upstream.disconnected.wait()


async def test_client_leaving_during_the_first_byte_wait_ends_the_upstream_request() -> None:
    upstream = WatchesDisconnect(events_first=0)
    async with proxy_in_front_of(upstream) as url, httpx.AsyncClient() as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(client.post, f"{url}/v1/chat/completions", json=STREAM))
            with anyio.fail_after(5):
                await upstream.requested.wait()
            tg.cancel_scope.cancel()  # the client gives up before any byte came back
        with anyio.fail_after(1):
            await upstream.disconnected.wait()


@pytest.mark.parametrize("first_byte", [0.005, 0.3])  # before and after the disconnect watch starts
async def test_no_first_byte_in_time_is_a_504(first_byte: float) -> None:
    timeouts = {"first_byte": first_byte}
    async with proxy_in_front_of(Silent(), timeouts=timeouts) as url, httpx.AsyncClient() as client:
        response = await client.post(f"{url}/v1/chat/completions", json=CHAT)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert response.headers["x-proxykit-attempts"] == "chat#0:timeout"


async def test_unreachable_upstream_is_a_502() -> None:
    from proxykit import create_app
    from tests.conftest import make_config, serve

    config = make_config("http://127.0.0.1:9/v1")  # the discard port: nothing listens
    async with serve(create_app(config)) as url, httpx.AsyncClient() as client:
        response = await client.post(f"{url}/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert "127.0.0.1:9" not in response.text


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("partial", [b"", b'data: {"choi'], ids=["between-events", "mid-event"])
async def test_stream_cut_upstream_ends_with_an_error_event_and_no_done(
    partial: bytes, transport: Callable[[], httpx.AsyncBaseTransport | None],
) -> None:
    received = b""
    upstream = BreaksOff(events=2, partial=partial)
    async with proxy_in_front_of(upstream, transport=transport()) as url, httpx.AsyncClient() as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=STREAM) as response:
            with pytest.raises(httpx.RemoteProtocolError):  # the body never completes
                async for chunk in response.aiter_raw():
                    received += chunk
    assert received.startswith(event(0) + event(1) + partial)
    assert b"[DONE]" not in received
    last_event = received.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    error = json.loads(last_event.removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_error"
    assert error["request_id"] == response.headers["x-request-id"]
