"""Retries use their whole budget (CONTRACT section 3): against a real uvicorn upstream."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit import create_app
from tests.conftest import CHAT, serve
from tests.upstreams import read_body

pytestmark = pytest.mark.anyio


class Scripted:
    """Answers each call with the next status of `script` (then 200 for ever); counts calls."""

    def __init__(self, *script: int, retry_after: str | None = None) -> None:
        self.script = iter(script)
        self.retry_after = retry_after
        self.calls = 0
        self.keys: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        self.calls += 1
        self.keys.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        status = next(self.script, 200)
        headers = [(b"content-type", b"application/json")]
        if status == 429 and self.retry_after is not None:
            headers.append((b"retry-after", self.retry_after.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"status": %d}' % status})


class EveryOther:
    """A vLLM-style server that answers 503 to every other request."""

    def __init__(self) -> None:
        self.flip = itertools.cycle([200, 503])
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        self.calls += 1
        status = next(self.flip)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"status": %d}' % status})


def config_for(url: str, api_keys: list[str] | None = None, **retry: Any) -> dict[str, Any]:
    deployment: dict[str, Any] = {"base_url": f"{url}/v1"}
    if api_keys is not None:
        deployment["api_keys"] = api_keys
    return {
        "models": [{"name": "chat", "deployments": [deployment]}],
        "retry": {"attempts": 3, "backoff": {"initial": 0.01, "max": 2.0}, **retry},
    }


async def through_proxy(
    upstream: ASGIApp, api_keys: list[str] | None = None, *, requests: int = 1,
) -> list[httpx.Response]:
    """`requests` chat completions, one after another, through a real proxy in front of `upstream`."""
    async with serve(upstream, lifespan="off") as url:
        async with serve(create_app(config_for(url, api_keys))) as proxy, httpx.AsyncClient(base_url=proxy) as client:
            return [await client.post("/v1/chat/completions", json=CHAT) for _ in range(requests)]


async def test_a_keyless_deployment_is_retried_on_itself() -> None:
    upstream = EveryOther()
    responses = await through_proxy(upstream, requests=10)
    assert [response.status_code for response in responses] == [200] * 10
    assert upstream.calls > 10  # the 503s were retried, on the one upstream there is
    retried = [r.headers["x-proxykit-attempts"] for r in responses if "," in r.headers["x-proxykit-attempts"]]
    assert retried and all(attempts == "chat#0:http_5xx,chat#0:ok" for attempts in retried)


async def test_a_two_key_pool_whose_keys_each_fail_once_is_tried_a_third_time() -> None:
    upstream = Scripted(500, 500)
    [response] = await through_proxy(upstream, ["sk-a-0000", "sk-b-1111"])
    assert response.status_code == 200
    assert response.headers["x-proxykit-attempts"] == "chat#0:http_5xx,chat#1:http_5xx,chat#0:ok"
    assert upstream.keys == ["Bearer sk-a-0000", "Bearer sk-b-1111", "Bearer sk-a-0000"]


async def test_a_resting_key_that_returns_within_backoff_max_is_waited_for() -> None:
    upstream = Scripted(429, retry_after="1")  # one key: it rests 1 s, within backoff.max
    [response] = await through_proxy(upstream, ["sk-only-0000"])
    assert response.status_code == 200
    assert response.headers["x-proxykit-attempts"] == "chat#0:http_429,chat#0:ok"


async def test_a_key_resting_past_backoff_max_ends_with_the_upstream_429() -> None:
    upstream = Scripted(429, retry_after="60")
    [response] = await through_proxy(upstream, ["sk-only-0000"])
    assert response.status_code == 429
    assert response.headers["retry-after"] == "60"
    assert upstream.calls == 1


async def test_a_client_that_leaves_stops_the_wait_for_a_resting_key() -> None:
    upstream = Scripted(429, retry_after="1.5")
    async with serve(upstream, lifespan="off") as url:
        config = config_for(url, ["sk-only-0000"])
        async with serve(create_app(config)) as proxy, httpx.AsyncClient(base_url=proxy) as client:
            with anyio.move_on_after(0.5):  # the client gives up while the proxy waits for the key
                await client.post("/v1/chat/completions", json=CHAT)
            await anyio.sleep(2.0)  # past the key's return: a proxy still waiting would call again
    assert upstream.calls == 1


async def test_a_huge_retry_after_rests_the_key_for_a_day_at_most() -> None:
    upstream = Scripted(429, retry_after="1e300")
    first, second = await through_proxy(upstream, ["sk-only-0000"], requests=2)
    assert first.status_code == 429
    assert second.status_code == 503  # the key rests: no attempt could be made
    assert int(second.headers["retry-after"]) <= 86_400
