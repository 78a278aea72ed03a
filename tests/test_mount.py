"""proxykit mounted inside host apps, with and without its lifespan wired."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from proxykit import DemoUpstream, create_app
from proxykit.demo import demo_config
from tests.conftest import serve

pytestmark = pytest.mark.anyio

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "mounted"}]}


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host route")


async def test_mounted_without_lifespan_wiring_opens_on_first_request(caplog: pytest.LogCaptureFixture) -> None:
    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        proxy = create_app(demo_config(f"{upstream_url}/v1"))
        host = Starlette(routes=[Route("/hello", hello), Mount("/llm", app=proxy)])  # no lifespan=
        async with serve(host) as url, httpx.AsyncClient(base_url=url) as client:
            with caplog.at_level(logging.WARNING, logger="proxykit"):
                first = await client.post("/llm/v1/chat/completions", json=CHAT)
                second = await client.post("/llm/v1/chat/completions", json=CHAT)
            models = await client.get("/llm/v1/models")
            own = await client.get("/hello")
        # Nothing runs proxykit's shutdown when the host does not wire its lifespan.
        await proxy.state.resources.aclose()
    assert first.status_code == second.status_code == 200
    assert "You said: mounted" in first.json()["choices"][0]["message"]["content"]
    assert [m["id"] for m in models.json()["data"]] == ["demo-chat", "demo-reasoner", "demo-embed", "demo-flaky"]
    assert own.text == "host route"
    warnings = [r for r in caplog.records if "lifespan" in r.getMessage()]
    assert len(warnings) == 1  # once, not once a request


async def test_mounted_with_lifespan_wiring_opens_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        proxy = create_app(demo_config(f"{upstream_url}/v1"))
        host = Starlette(routes=[Mount("/llm", app=proxy)], lifespan=proxy.router.lifespan_context)
        with caplog.at_level(logging.WARNING, logger="proxykit"):
            async with serve(host) as url, httpx.AsyncClient(base_url=url) as client:
                response = await client.post("/llm/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert not [r for r in caplog.records if "lifespan" in r.getMessage()]


async def test_fastapi_example_serves_its_routes_and_the_proxy(tmp_path: Path) -> None:
    from examples.fastapi_app import build_app

    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        config_path = tmp_path / "proxykit.yaml"
        config_path.write_text(yaml.safe_dump(demo_config(f"{upstream_url}/v1")))
        async with serve(build_app(config_path)) as url, httpx.AsyncClient(base_url=url) as client:
            own = await client.get("/hello")
            proxied = await client.post("/llm/v1/chat/completions", json=CHAT)
            health = await client.get("/llm/health")
    assert own.json() == {"hello": "from the host app"}
    assert proxied.status_code == 200
    assert proxied.headers["x-proxykit-attempts"] == "demo-chat#0:ok"
    assert health.json() == {"status": "ok"}


async def test_hand_composed_stack_from_the_readme() -> None:
    from starlette.middleware import Middleware

    import proxykit

    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        config = proxykit.config_from_dict(
            {**demo_config(f"{upstream_url}/v1"), "auth": {"keys": [{"name": "me", "key": "hand-key"}]}}
        )
        resources = proxykit.Resources(config)
        limit = config.limits.max_body_bytes
        app = Starlette(
            routes=[Mount("/v1", app=proxykit.Forwarder(resources))],
            middleware=[
                Middleware(proxykit.RequestIdMiddleware),
                Middleware(proxykit.AuthMiddleware, keys=config.auth.keys),
                Middleware(
                    proxykit.RetryMiddleware, policy=proxykit.RetryPolicy.from_config(config), max_body_bytes=limit
                ),
                Middleware(proxykit.KeyRotationMiddleware, pool=resources.keys, max_body_bytes=limit),
            ],
            lifespan=resources.lifespan,
        )
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
            refused = await client.post("/v1/chat/completions", json=CHAT)
            allowed = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "hand-key"})
    assert refused.status_code == 401
    assert allowed.status_code == 200
    assert allowed.headers["x-proxykit-attempts"] == "demo-chat#0:ok"


async def test_standalone_app_runs_its_lifespan_through_every_middleware(caplog: pytest.LogCaptureFixture) -> None:
    # uvicorn's "auto" lifespan mode quietly gives up on an app whose middleware chokes on the
    # lifespan scope; resources would then open lazily and never close.
    config = {**demo_config("http://127.0.0.1:9/v1"), "auth": {"keys": [{"name": "a", "key": "k"}]}}
    app = create_app(config)
    with caplog.at_level(logging.WARNING, logger="proxykit"):
        async with serve(app, lifespan="on") as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/health")).status_code == 200
            assert app.state.resources.state.name == "OPENED"
    assert app.state.resources.state.name == "CLOSED"
    assert not [r for r in caplog.records if "lifespan" in r.getMessage()]


def test_a_test_client_outside_a_with_block_gets_every_answer() -> None:
    # Starlette's TestClient outside `with` runs each request on an event loop of its own: nothing
    # bound to the first loop (connections, timers) may be used on the next.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(DemoUpstream(delay=0), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    # Each request's loop ends with its upstream connection open, and nothing runs proxykit's
    # shutdown (the host has no lifespan here): the garbage collector closes those sockets.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            deadline = time.monotonic() + 10
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.01)
            upstream_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
            host = Starlette(routes=[Mount("/llm", app=create_app(demo_config(upstream_url)))])
            client = TestClient(host)
            for _ in range(3):
                response = client.post("/llm/v1/chat/completions", json=CHAT)
                assert response.status_code == 200, response.text
                assert "You said: mounted" in response.json()["choices"][0]["message"]["content"]
            del host, client  # the last connection with them, collected below
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()
            gc.collect()
