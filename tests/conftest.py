"""Shared fixtures: real uvicorn servers on 127.0.0.1, respx upstreams, and config builders."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
import pytest
import respx
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from proxykit import create_app

UPSTREAM_KEYS = ["sk-upstream-secret-0000", "sk-upstream-secret-1111"]
CLIENT_KEY = "pk-client-secret-aaaa"
OTHER_CLIENT_KEY = "pk-client-secret-bbbb"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

ServeApp = Callable[[ASGIApp], AbstractAsyncContextManager[str]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _in_temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own directory: the default store (`sqlite:///proxykit.db`, relative to
    the working directory) and anything else a test writes stays there."""
    monkeypatch.chdir(tmp_path)


def make_config(base_url: str = "http://upstream.test/v1", **overrides: Any) -> dict[str, Any]:
    """One model `chat` (upstream id `upstream-chat`) with two keys, plus any top-level overrides."""
    config: dict[str, Any] = {
        "models": [{
            "name": "chat",
            "deployments": [{"base_url": base_url, "model": "upstream-chat", "api_keys": list(UPSTREAM_KEYS)}],
        }],
    }
    config.update(overrides)
    return config


def with_auth(config: dict[str, Any]) -> dict[str, Any]:
    config["auth"] = {"keys": [
        {"name": "team-a", "key": CLIENT_KEY},
        {"name": "team-b", "key": OTHER_CLIENT_KEY, "models": ["other-*"]},
    ]}
    return config


def streamed(status: int, *chunks: bytes, **kwargs: Any) -> httpx.Response:
    """A respx response whose body arrives chunk by chunk (Response(json=...) is pre-read)."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return httpx.Response(status, content=body(), **kwargs)


@asynccontextmanager
async def serve(
    app: ASGIApp, *, lifespan: Literal["auto", "on", "off"] = "auto", port: int = 0,
) -> AsyncIterator[str]:
    """Run `app` under a real uvicorn server on 127.0.0.1 (a free port, or `port`, so that a
    server can stop and come back on the same one); yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    # A bounded graceful shutdown: an app stuck in a test must fail that test, not hang the run.
    config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:
                    await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
    finally:
        sock.close()


@asynccontextmanager
async def proxy_in_front_of(
    upstream: ASGIApp, *, transport: httpx.AsyncBaseTransport | None = None, **overrides: Any
) -> AsyncIterator[str]:
    """A real upstream server and a real proxy server in front of it; yields the proxy's URL."""
    async with serve(upstream, lifespan="off") as upstream_url:
        config = make_config(f"{upstream_url}/v1", **overrides)
        async with serve(create_app(config, transport=transport)) as proxy_url:
            yield proxy_url


@asynccontextmanager
async def in_process(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that calls `app` in process, with the app's lifespan run around it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            yield client


@asynccontextmanager
async def respx_proxy(config: dict[str, Any]) -> AsyncIterator[tuple[respx.MockRouter, httpx.AsyncClient]]:
    """The proxy in process, its upstream a respx router; every route must be called."""
    # No `with router`: that would patch httpx globally. The router is only this app's transport.
    router = respx.MockRouter(assert_all_called=True, base_url="http://upstream.test/v1", using=None)
    app = create_app(config, transport=httpx.MockTransport(router.async_handler))
    async with in_process(app) as client:
        yield router, client
    router.assert_all_called()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ProxykitProcess:
    """A `proxykit serve ...` child process; `output` holds what it printed once it ended."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def proxykit_process(tmp_path: Path, *args: str) -> AsyncIterator[ProxykitProcess]:
    """Runs `python -m proxykit serve ARGS --port P` until /health answers; stops it on exit."""
    port = free_port()
    log_path = tmp_path / f"proxykit-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxykit", "serve", *args, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_up(f"{url}/health", process, log_path, timeout=20)
        yield ProxykitProcess(url, process, log_path)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_until_up(url: str, process: subprocess.Popen[bytes], log_path: Path, *, timeout: float) -> None:
    """Polls `url` until it answers 200; fails at once, with the log, if `process` exits first."""
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(timeout):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{log_path.name}: the process exited early:\n{log_path.read_text()}")
                try:
                    if (await client.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.05)
