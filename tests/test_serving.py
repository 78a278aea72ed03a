"""Readiness and shutdown: 503 only for the process's own state, and a SIGTERM that lets streams
in flight finish within the grace period. And how `proxykit serve` writes an answer."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.server import ServerState

from proxykit import create_app
from proxykit.serving import DrainingServer, GuardedHttpToolsProtocol, ServerLimits
from tests.conftest import CHAT, ProxykitProcess, in_process, make_config, proxykit_process, serve
from tests.upstreams import GatedStream

pytestmark = pytest.mark.anyio


async def test_one_dead_upstream_never_makes_the_process_unready() -> None:
    config = make_config(models=[
        {"name": "dead", "deployments": [{"base_url": "http://127.0.0.1:9/v1"}]},
        {"name": "chat", "deployments": [{"base_url": "http://upstream.test/v1"}]},
    ], retry={"attempts": 0})
    async with in_process(create_app(config)) as client:
        failed = await client.post("/v1/chat/completions", json={**CHAT, "model": "dead"})
        ready = await client.get("/health/ready")
    assert failed.status_code == 502
    assert ready.status_code == 200
    assert ready.json()["status"] == "ok"
    assert set(ready.json()["models"]) == {"dead", "chat"}


async def test_a_draining_server_answers_readiness_with_503() -> None:
    app = create_app(make_config())
    config = uvicorn.Config(app)
    config.load()
    server = DrainingServer(config)
    async with in_process(app) as client:
        before = await client.get("/health/ready")
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        during = await client.get("/health/ready")
        liveness = await client.get("/health")
    assert before.status_code == 200
    assert (during.status_code, during.json()["status"]) == (503, "draining")
    assert server.should_exit
    assert liveness.status_code == 200  # alive, only not taking new work


def connect_refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


class InFlight(NamedTuple):
    upstream: GatedStream  # release the rest of the stream with it
    proxy: ProxykitProcess
    client: httpx.AsyncClient  # the stream's own client, on its one connection
    chunks: AsyncIterator[bytes]  # the rest of the stream
    first: bytes


@asynccontextmanager
async def a_stream_in_flight(tmp_path: Path, *serve_args: str, events: int = 3) -> AsyncIterator[InFlight]:
    """A real `proxykit serve` relaying a stream whose first event has arrived."""
    upstream = GatedStream(events=events)
    try:
        async with serve(upstream, lifespan="off") as upstream_url:
            path = tmp_path / "c.yaml"
            path.write_text(json.dumps(make_config(f"{upstream_url}/v1")))
            async with proxykit_process(tmp_path, "--config", str(path), *serve_args) as proxy:
                async with httpx.AsyncClient(timeout=30) as client:
                    body = {**CHAT, "stream": True}
                    async with client.stream("POST", f"{proxy.url}/v1/chat/completions", json=body) as response:
                        chunks = response.aiter_raw()
                        upstream.release(0)
                        yield InFlight(upstream, proxy, client, chunks, await chunks.__anext__())
    finally:
        for n in range(events + 1):  # an upstream still waiting must let its server stop
            upstream.release(n)


@pytest.mark.parametrize("workers", [pytest.param(1, id="one-process"), pytest.param(2, id="workers")])
async def test_sigterm_lets_a_stream_in_flight_finish_then_exits(tmp_path: Path, workers: int) -> None:
    async with a_stream_in_flight(tmp_path, "--workers", str(workers)) as (upstream, proxy, _, chunks, first):
        proxy.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):  # new connections stop while the stream goes on
            while not connect_refused(proxy.url):
                await anyio.sleep(0.1)
        for n in (1, 2, 3):
            upstream.release(n)
        rest = b"".join([chunk async for chunk in chunks])
        with anyio.fail_after(20):
            while proxy.process.poll() is None:
                await anyio.sleep(0.1)
    assert first.startswith(b"data: ")
    assert rest.endswith(b"data: [DONE]\n\n")  # the whole stream, after the SIGTERM
    assert proxy.process.returncode == 0


async def test_a_stream_longer_than_the_grace_period_is_cut_and_the_process_exits(tmp_path: Path) -> None:
    async with a_stream_in_flight(tmp_path, "--timeout-graceful-shutdown", "1") as flight:
        proxy, chunks = flight.proxy, flight.chunks
        proxy.process.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.RemoteProtocolError):  # cut, never seen as complete
            async for _ in chunks:
                pass
        try:
            proxy.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the process outlived its grace period")


async def test_limit_concurrency_refuses_what_is_past_it_with_503(tmp_path: Path) -> None:
    async with a_stream_in_flight(tmp_path, "--limit-concurrency", "2", events=1) as flight:
        async with httpx.AsyncClient(timeout=30) as other:  # a second connection
            refused = await other.get(f"{flight.proxy.url}/health")
        flight.upstream.release(1)
        async for _ in flight.chunks:
            pass
        after = await flight.client.get(f"{flight.proxy.url}/health")  # the stream's connection, now free
    assert refused.status_code == 503
    assert after.status_code == 200
    # The start banner says what is served, without a key.
    assert "proxykit serving 1 models (1 deployments, 2 upstream keys) at http://127.0.0.1:" in flight.proxy.output
    assert "auth off, limits memory, cache off" in flight.proxy.output


class RecordingTransport(asyncio.Transport):
    """A connection's far end as the protocol sees it: each write call, as one item."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.writes.append(b"".join(list_of_data))  # one `writev`, one call

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@asynccontextmanager
async def one_request(app: ASGIApp, method: bytes = b"POST") -> AsyncIterator[RecordingTransport]:
    """`proxykit serve`'s protocol on a recorded connection, given one request for `app`; the
    transport's `protocol` is the protocol."""
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning")
    config.load()
    transport = RecordingTransport()
    protocol = GuardedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={}, limits=ServerLimits())
    protocol.connection_made(transport)
    transport.protocol = protocol
    protocol.data_received(method + b" /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    try:
        yield transport
    finally:
        protocol.connection_lost(None)


def answer(*pieces: bytes, length: int | None = None) -> ASGIApp:
    """An app whose answer has a `content-length` (of `pieces`, unless given) and is sent in `pieces`."""
    size = sum(map(len, pieces)) if length is None else length

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % size)]})
        for i, piece in enumerate(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < len(pieces) - 1})

    return app


async def until(done: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not done():
            await anyio.sleep(0)


async def test_an_answer_of_known_length_goes_out_head_and_body_in_one_write() -> None:
    async with one_request(answer(b'{"id": "x"}')) as transport:
        await until(lambda: len(transport.writes) >= 1)
        await anyio.sleep(0.01)
    assert len(transport.writes) == 1
    head, body = transport.writes[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 11" in head
    assert body == b'{"id": "x"}'


async def test_a_finished_answer_leaves_no_reference_cycle_for_the_garbage_collector() -> None:
    async with one_request(answer(b'{"id": "x"}')) as transport:
        cycle = transport.protocol.cycle
        await until(lambda: cycle.response_complete)
        assert cycle.transport is not transport  # the cycle writes through the joining transport
        assert cycle not in gc.get_referents(cycle.transport)  # which holds it no more


async def test_only_the_head_waits_each_later_piece_of_the_body_is_its_own_write() -> None:
    async with one_request(answer(b"first ", b"second ", b"third")) as transport:
        await until(lambda: len(transport.writes) >= 3)
    assert [write.split(b"\r\n\r\n")[-1] for write in transport.writes] == [b"first ", b"second ", b"third"]
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_streams_head_goes_out_before_its_first_event_is_sent() -> None:
    first_event = anyio.Event()

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await first_event.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": False})

    async with one_request(stream) as transport:
        await until(lambda: len(transport.writes) >= 1)
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and transport.writes[0].endswith(b"\r\n\r\n")
        first_event.set()
        await until(lambda: len(transport.writes) >= 2)
    assert b"data: 1\n\n" in transport.writes[1]


async def test_a_head_request_is_answered_with_its_head_at_once() -> None:
    # The length a GET would have, and no body: uvicorn writes nothing for a HEAD request's body.
    async with one_request(answer(b"", length=11), method=b"HEAD") as transport:
        cycle = transport.protocol.cycle
        await until(lambda: cycle.response_complete)
    assert len(transport.writes) == 1  # the head, not held for a body that never comes
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 11" in transport.writes[0]


async def test_an_app_that_fails_after_a_start_of_known_length_still_gets_its_head_out_before_the_close() -> None:
    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        raise RuntimeError("a bug after the start")

    async with one_request(fails) as transport:
        await until(lambda: transport.closed)
    assert [write[:15] for write in transport.writes] == [b"HTTP/1.1 200 OK"]
