"""Active health checks against real servers: a deployment whose server stops answering goes
unhealthy, routing skips it while its model has a healthy one, and it comes back."""

from __future__ import annotations

import json

import anyio
import pytest
from starlette.types import Receive, Scope, Send

from proxykit import create_app
from tests.conftest import CHAT, free_port, in_process, serve
from tests.upstreams import read_body

pytestmark = pytest.mark.anyio


class Counting:
    """Answers `GET /v1/models` and chat completions, and counts each."""

    def __init__(self) -> None:
        self.checks = 0
        self.completions = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        if scope["method"] == "GET":
            self.checks += 1
            body: dict[str, object] = {"object": "list", "data": []}
        else:
            self.completions += 1
            body = {"choices": [], "usage": {"total_tokens": 2}}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def test_a_deployment_that_stops_answering_is_skipped_until_it_recovers() -> None:
    steady, flaky = Counting(), Counting()
    port = free_port()
    async with serve(steady, lifespan="off") as steady_url:
        config = {
            "models": [{"name": "chat", "deployments": [
                {"base_url": f"{steady_url}/v1", "name": "steady"},
                {"base_url": f"http://127.0.0.1:{port}/v1", "name": "flaky"},
            ]}],
            "health": {"interval": 0.1, "failure_threshold": 2, "recovery_threshold": 2},
            "routing": {"strategy": "round-robin"},
            "store": {"url": "none"},
        }
        app = create_app(config)
        pool = app.state.resources.keys
        async with in_process(app) as client:
            async with serve(flaky, lifespan="off", port=port):
                with anyio.fail_after(5):
                    while flaky.checks < 2:  # GET /models, no completion
                        await anyio.sleep(0.05)
                assert flaky.completions == 0 and "flaky" not in pool.unhealthy
            with anyio.fail_after(5):  # its server is gone: two failed checks in a row
                while "flaky" not in pool.unhealthy:
                    await anyio.sleep(0.05)
            answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(6)]
            metrics = (await client.get("/metrics")).text
            status = (await client.get("/api/llm/models/chat/status")).json()
            ready = (await client.get("/health/ready")).json()["models"]["chat"]["deployments"]
            async with serve(flaky, lifespan="off", port=port):
                with anyio.fail_after(5):
                    while "flaky" in pool.unhealthy:
                        await anyio.sleep(0.05)
                for _ in range(4):
                    await client.post("/v1/chat/completions", json=CHAT)
    assert all(answer.status_code == 200 for answer in answers)
    assert all(answer.headers["x-proxykit-attempts"].startswith("steady#0:ok") for answer in answers)  # no failed try
    assert 'proxykit_deployment_healthy{deployment="flaky",model="chat"} 0.0' in metrics
    assert status["health"] == "degraded" and status["deployments"] == {"steady": "healthy", "flaky": "unhealthy"}
    assert status["last_check"] is not None
    assert ready["flaky"]["healthy"] is False and ready["steady"]["healthy"] is True
    assert flaky.completions == 2  # back in rotation: round-robin sends it every other request


async def test_a_429_or_a_refused_key_is_never_a_failed_check() -> None:
    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        status = 429 if scope["path"].endswith("/models") else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async with serve(limited, lifespan="off") as url:
        config = {"models": [{"name": "chat", "deployments": [
            {"base_url": f"{url}/v1", "name": "a"}, {"base_url": f"{url}/v1", "name": "b"}]}],
            "health": {"interval": 0.05, "failure_threshold": 1}, "store": {"url": "none"}}
        app = create_app(config)
        async with in_process(app):
            health = app.state.resources.health
            with anyio.fail_after(5):
                while health.of("a").last_check is None:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.2)
            assert app.state.resources.keys.unhealthy == set()
            assert health.of("a").last_result == "ok"


async def test_checks_can_be_turned_off() -> None:
    upstream = Counting()
    async with serve(upstream, lifespan="off") as url:
        config = {"models": [{"name": "chat", "deployments": [{"base_url": f"{url}/v1"}]}],
                  "health": {"interval": 0}, "store": {"url": "none"}}
        app = create_app(config)
        async with in_process(app) as client:
            await client.post("/v1/chat/completions", json=CHAT)
            await anyio.sleep(0.3)
    assert upstream.checks == 0 and upstream.completions == 1

