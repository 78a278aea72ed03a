"""A hostile upstream and hostile clients against a real `proxykit serve`: each fault gets a clear
answer, and the proxy's peak memory (VmHWM in /proc/PID/status) stays within a bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import CHAT, ProxykitProcess, proxykit_process
from tests.raw_upstream import MiB, peak_rss_kib, raw_request, raw_upstream

pytestmark = pytest.mark.anyio

GROWTH_LIMIT_KIB = 24 * 1024  # a hostile answer may cost a few buffers, never its own size
BEHAVIOURS = ("ok", "huge-headers", "long-line", "gzip-bomb", "switching")


@asynccontextmanager
async def hostile_proxy(tmp_path: Path, *args: str) -> AsyncIterator[ProxykitProcess]:
    """`proxykit serve` with one model per raw-upstream behaviour, named after it."""
    async with raw_upstream() as upstream:
        config = {
            "models": [
                {"name": name, "deployments": [{"base_url": f"{upstream}/{name}/v1"}]} for name in BEHAVIOURS
            ],
            "retry": {"attempts": 0},
        }
        path = tmp_path / "hostile.yaml"
        path.write_text(json.dumps(config))
        async with proxykit_process(tmp_path, "--config", str(path), *args) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:  # warm: the baseline has served once
                assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "ok"})).status_code == 200
            yield proxy


async def test_64_mib_of_response_headers_is_a_502_and_costs_no_memory(tmp_path: Path) -> None:
    async with hostile_proxy(tmp_path) as proxy, httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
        before = peak_rss_kib(proxy.process.pid)
        response = await client.post("/v1/chat/completions", json={**CHAT, "model": "huge-headers"})
        growth = peak_rss_kib(proxy.process.pid) - before
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert response.headers["x-proxykit-attempts"] == "huge-headers#0:http_5xx"  # not connect_error
    assert growth < GROWTH_LIMIT_KIB


async def test_a_32_mib_event_line_is_relayed_whole_without_holding_it(tmp_path: Path) -> None:
    async with hostile_proxy(tmp_path) as proxy, httpx.AsyncClient(base_url=proxy.url, timeout=60) as client:
        before = peak_rss_kib(proxy.process.pid)
        received = 0
        body = {**CHAT, "model": "long-line", "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for chunk in response.aiter_raw():
                received += len(chunk)
        growth = peak_rss_kib(proxy.process.pid) - before
    assert response.status_code == 200
    assert received >= 32 * MiB  # relayed, never cut: counting usage gave up, not the stream
    assert growth < GROWTH_LIMIT_KIB


async def test_a_gzip_bomb_is_relayed_as_it_came_without_inflating_it(tmp_path: Path) -> None:
    async with hostile_proxy(tmp_path) as proxy, httpx.AsyncClient(base_url=proxy.url, timeout=60) as client:
        before = peak_rss_kib(proxy.process.pid)
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "model": "gzip-bomb"}) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        growth = peak_rss_kib(proxy.process.pid) - before
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert len(raw) < 2 * MiB  # the compressed bytes, as the upstream sent them
    assert growth < GROWTH_LIMIT_KIB


async def test_an_upstream_that_switches_protocols_gets_a_502_and_the_worker_lives(tmp_path: Path) -> None:
    async with hostile_proxy(tmp_path) as proxy, httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "model": "switching"})
        after = await client.post("/v1/chat/completions", json={**CHAT, "model": "ok"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert after.status_code == 200
    assert "Fatal error" not in proxy.output and "Traceback" not in proxy.output


async def test_a_header_block_over_the_limit_gets_431(tmp_path: Path) -> None:
    async with hostile_proxy(tmp_path) as proxy:
        big = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (80 * 1024) + b"\r\n\r\n"
        many = b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(150)) + b"\r\n"
        for request in (big, many):
            answer = await raw_request(proxy.url, request)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["code"] == "request_header_fields_too_large"


async def test_48_mib_of_request_headers_are_not_held(tmp_path: Path) -> None:
    async with hostile_proxy(tmp_path) as proxy:
        before = peak_rss_kib(proxy.process.pid)
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            line = b"x-pad: " + b"a" * 1016 + b"\r\n"  # 1 KiB a header, 49,152 of them
            with contextlib.suppress(OSError):  # the proxy refuses and closes long before the end
                for _ in range(48):
                    sock.sendall(line * 1024)
        growth = peak_rss_kib(proxy.process.pid) - before
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert (await client.get("/health")).status_code == 200
    assert growth < GROWTH_LIMIT_KIB


async def in_flight(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("proxykit_in_flight_requests{"))


async def test_slow_clients_are_timed_out(tmp_path: Path) -> None:
    args = ("--header-timeout", "1", "--body-timeout", "1")
    async with hostile_proxy(tmp_path, *args) as proxy, httpx.AsyncClient(base_url=proxy.url) as client:
        idle = await in_flight(client)  # the scrape counts itself
        partial_headers = raw_request(proxy.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        stalled_body = raw_request(
            proxy.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: 100\r\n\r\n{\"model\": ",
        )
        silent = raw_request(proxy.url, b"")
        with anyio.fail_after(8):  # each is answered or closed by the proxy, not by our read timeout
            answers = [await partial_headers, await stalled_body, await silent]
            while await in_flight(client) > idle:  # the stalled request left the gauge
                await anyio.sleep(0.1)
    assert answers[0].startswith(b"HTTP/1.1 408 ")
    assert answers[1].startswith(b"HTTP/1.1 408 ")
    assert answers[2] == b""  # nothing asked, nothing answered: the connection is closed


async def test_a_body_that_keeps_coming_slowly_is_not_timed_out(tmp_path: Path) -> None:
    async with hostile_proxy(tmp_path, "--body-timeout", "1") as proxy:
        body = json.dumps({**CHAT, "model": "ok"}).encode()
        host, port = proxy.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body))
        for piece in (body[:10], body[10:20], body[20:]):  # 2 s in all, never 1 s of silence
            writer.write(piece)
            await writer.drain()
            await anyio.sleep(0.6)
        with anyio.fail_after(10):
            answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
