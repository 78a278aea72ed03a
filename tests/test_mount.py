"""proxykit mounted inside host apps, with and without its lifespan wired."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

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
