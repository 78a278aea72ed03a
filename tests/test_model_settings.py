"""A model's `enabled`, `defaults` and `rate_limit`, and deployment priority tiers, through the app."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import CHAT, respx_proxy, streamed

pytestmark = pytest.mark.anyio

A, B = "pk-model-settings-a", "pk-model-settings-b"


def config(**model: Any) -> dict[str, Any]:
    return {
        "models": [
            {"name": "chat", "fallbacks": ["spare"], "deployments": [
                {"base_url": "http://upstream.test/v1", "api_keys": ["sk-1"]}], **model},
            {"name": "spare", "deployments": [{"base_url": "http://upstream.test/v1", "name": "spare",
                                               "api_keys": ["sk-2"]}]},
        ],
        "auth": {"keys": [{"name": "a", "key": A}, {"name": "b", "key": B}]},
        "store": {"url": "none"},
    }


def ok(request: httpx.Request) -> httpx.Response:
    return streamed(200, b'{"usage": {"total_tokens": 3}}', headers={"content-type": "application/json"})


async def test_a_disabled_model_answers_503_and_is_not_listed() -> None:
    async with respx_proxy(config(enabled=False)) as (router, client):
        router.post("/chat/completions").mock(side_effect=ok)
        refused = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": A})
        listed = (await client.get("/v1/models", headers={"x-api-key": A})).json()["data"]
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "spare"},
                                  headers={"x-api-key": A})).status_code == 200
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    assert [model["id"] for model in listed] == ["spare"]


async def test_a_disabled_fallback_is_skipped() -> None:
    data = config()
    data["models"][1]["enabled"] = False
    async with respx_proxy(data) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(500, b"{}"))
        response = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": A})
    assert response.status_code == 500
    assert "spare" not in response.headers["x-proxykit-attempts"]


async def test_defaults_fill_only_what_the_client_left_out() -> None:
    async with respx_proxy(config(defaults={"temperature": 0.7, "max_tokens": 2000})) as (router, client):
        route = router.post("/chat/completions").mock(side_effect=ok)
        await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": A})
        await client.post("/v1/chat/completions", json={**CHAT, "temperature": 0}, headers={"x-api-key": A})
    first, second = (json.loads(call.request.content) for call in route.calls)
    assert (first["temperature"], first["max_tokens"]) == (0.7, 2000)
    assert (second["temperature"], second["max_tokens"]) == (0, 2000)  # the client's own value stays


async def test_a_model_rate_limit_holds_across_clients() -> None:
    async with respx_proxy(config(rate_limit={"requests_per_minute": 3})) as (router, client):
        router.post("/chat/completions").mock(side_effect=ok)
        statuses = [(await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": key})).status_code
                    for key in (A, B, A, B)]
        other = await client.post("/v1/chat/completions", json={**CHAT, "model": "spare"}, headers={"x-api-key": B})
        metrics = (await client.get("/metrics")).text
    assert statuses == [200, 200, 200, 429] and other.status_code == 200
    assert 'proxykit_rate_limited_total{client="b",limit="model_rpm"} 1.0' in metrics
