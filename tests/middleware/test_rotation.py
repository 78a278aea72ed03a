"""Key pools end to end: a real uvicorn upstream that answers per key, a real proxy in front."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import pytest

from proxykit import create_app
from tests.conftest import CHAT, serve
from tests.keyed_upstream import KeyedUpstream

pytestmark = pytest.mark.anyio

FAST_RETRY = {"backoff": {"initial": 0, "max": 0}}


def keys(*behaviours: str) -> dict[str, str]:
    """Upstream keys named after what they do: {"sk-secret-0-429": "429", ...}."""
    return {f"sk-secret-{i}-{behaviour}": behaviour for i, behaviour in enumerate(behaviours)}


@asynccontextmanager
async def keyed_proxy(
    upstream: KeyedUpstream, *, deployments: list[dict[str, Any]] | None = None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(upstream, lifespan="off") as upstream_url:
        deployment = {"base_url": f"{upstream_url}/v1", "model": "up-chat", "api_keys": list(upstream.behaviours)}
        config: dict[str, Any] = {
            "models": [{"name": "chat", "deployments": deployments or [deployment]}],
            "retry": FAST_RETRY,
        }
        config.update(overrides)
        for model in config["models"]:
            for entry in model["deployments"]:
                entry["base_url"] = entry["base_url"].replace("UPSTREAM", upstream_url)
        async with serve(create_app(config)) as url, httpx.AsyncClient(base_url=url) as client:
            yield client


async def test_429_key_rests_and_traffic_moves_on_without_client_errors() -> None:
    upstream = KeyedUpstream(keys("429", "ok", "ok"))
    async with keyed_proxy(upstream, routing={"strategy": "round-robin"}) as client:
        responses = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(10)]
        ready = (await client.get("/health/ready")).json()
    assert [r.status_code for r in responses] == [200] * 10
    assert responses[0].headers["x-proxykit-attempts"] == "chat#0:http_429,chat#1:ok"
    assert upstream.calls["sk-secret-0-429"] == 1  # rested after its 429, never asked again
    counts = ready["models"]["chat"]["deployments"]["chat"]
    assert (counts["available"], counts["resting"], counts["reasons"]) == (2, 1, {"429": 1})
    assert 25 <= counts["next_return_s"] <= 30  # the upstream's Retry-After: 30


async def test_401_key_is_used_once_then_set_aside() -> None:
    upstream = KeyedUpstream(keys("401", "ok"))
    async with keyed_proxy(upstream) as client:
        responses = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(5)]
        ready = (await client.get("/health/ready")).json()
    assert [r.status_code for r in responses] == [200] * 5
    assert upstream.calls["sk-secret-0-401"] == 1
    counts = ready["models"]["chat"]["deployments"]["chat"]
    assert (counts["available"], counts["set_aside"]) == (1, 1)


async def test_401_is_retried_even_when_retry_on_leaves_it_out() -> None:
    upstream = KeyedUpstream(keys("401", "ok"))
    async with keyed_proxy(upstream, retry={"retry_on": [], **FAST_RETRY}) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["x-proxykit-attempts"] == "chat#0:http_4xx,chat#1:ok"


async def test_round_robin_is_exactly_even() -> None:
    upstream = KeyedUpstream(keys("ok", "ok", "ok", "ok"))
    async with keyed_proxy(upstream, routing={"strategy": "round-robin"}) as client:
        for _ in range(40):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert sorted(upstream.calls.values()) == [10, 10, 10, 10]


async def test_usage_based_keeps_every_key_under_its_rpm() -> None:
    upstream = KeyedUpstream(keys("ok", "ok", "ok"))
    deployment = {"base_url": "UPSTREAM/v1", "api_keys": list(upstream.behaviours), "rpm": 5}
    async with keyed_proxy(upstream, deployments=[deployment], limits={"queue_timeout": 0}) as client:
        responses = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(20)]
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 15 + [503] * 5
    assert sorted(upstream.calls.values()) == [5, 5, 5]
    refused = responses[-1]
    assert refused.json()["error"]["code"] == "no_upstream_available"
    assert 1 <= int(refused.headers["retry-after"]) <= 12  # one request's worth of a 5 rpm bucket


async def test_transient_500_is_retried_on_another_key() -> None:
    upstream = KeyedUpstream(keys("500-once", "ok"))
    async with keyed_proxy(upstream) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["x-proxykit-attempts"] == "chat#0:http_5xx,chat#1:ok"
    assert "x-should-retry" not in response.headers


async def test_unreachable_deployment_fails_over_to_a_healthy_one() -> None:
    upstream = KeyedUpstream(keys("ok"))
    deployments: list[dict[str, Any]] = [
        {"base_url": "http://127.0.0.1:9/v1", "name": "dead", "api_keys": "sk-dead-1,sk-dead-2"},
        {"base_url": "UPSTREAM/v1", "name": "alive", "api_keys": list(upstream.behaviours)},
    ]
    async with keyed_proxy(upstream, deployments=deployments) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    # The dead deployment's second key is skipped: it would not connect either.
    assert response.headers["x-proxykit-attempts"] == "dead#0:connect_error,alive#0:ok"


async def test_model_whose_only_deployment_is_unreachable_gets_502() -> None:
    upstream = KeyedUpstream({})
    deployments = [{"base_url": "http://127.0.0.1:9/v1", "api_keys": "sk-dead-1,sk-dead-2"}]
    async with keyed_proxy(upstream, deployments=deployments) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    # No other deployment to turn to: its keys are retried, as often as retry.attempts allows.
    assert response.headers["x-proxykit-attempts"] == ",".join(["chat#0:connect_error", "chat#1:connect_error"] * 2)
    assert response.headers["x-should-retry"] == "false"


async def test_fallback_model_is_used_after_the_primary_is_exhausted() -> None:
    upstream = KeyedUpstream({**keys("500", "500"), "sk-backup": "ok"})
    models = [
        {"name": "chat", "fallbacks": ["backup"], "deployments": [
            {"base_url": "UPSTREAM/v1", "model": "up-chat", "api_keys": ["sk-secret-0-500", "sk-secret-1-500"]}]},
        {"name": "backup", "deployments": [
            {"base_url": "UPSTREAM/v1", "model": "up-backup", "api_keys": ["sk-backup"]}]},
    ]
    async with keyed_proxy(upstream, models=models) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["x-proxykit-attempts"] == "chat#0:http_5xx,chat#1:http_5xx,backup#0:ok"
    assert upstream.models == ["up-chat", "up-chat", "up-backup"]


async def test_when_every_key_rests_the_client_gets_503_with_retry_after() -> None:
    upstream = KeyedUpstream(keys("429", "429"), retry_after=30)
    async with keyed_proxy(upstream) as client:
        first = await client.post("/v1/chat/completions", json=CHAT)
        second = await client.post("/v1/chat/completions", json=CHAT)
    # The first request made attempts: the client gets the last upstream answer as it came.
    assert first.status_code == 429
    assert first.json() == {"error": {"message": "slow down"}}
    assert first.headers["retry-after"] == "30"
    assert first.headers["x-should-retry"] == "false"
    # The second found every key resting: no attempt could be made.
    assert second.status_code == 503
    error = second.json()["error"]
    assert error["code"] == "no_upstream_available"
    assert "all 2 keys are rate limited (429)" in error["message"]
    assert 25 <= int(second.headers["retry-after"]) <= 30
    assert sum(upstream.calls.values()) == 2


async def test_stream_is_never_retried_after_its_first_byte() -> None:
    upstream = KeyedUpstream(keys("stream-break", "ok"))
    received = b""
    async with keyed_proxy(upstream) as client:
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_raw():
                    received += chunk
    assert response.status_code == 200
    assert b'"code": "upstream_error"' in received
    assert dict(upstream.calls) == {"sk-secret-0-stream-break": 1}


async def test_client_leaving_during_backoff_stops_further_attempts(caplog: pytest.LogCaptureFixture) -> None:
    upstream = KeyedUpstream(keys("500", "ok"))
    slow_retry = {"backoff": {"initial": 60, "max": 60}}
    async with keyed_proxy(upstream, retry=slow_retry, timeouts={"first_byte": 600}) as client:
        with caplog.at_level(logging.INFO, logger="proxykit.access"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(client.post, "/v1/chat/completions", json=CHAT))
                with anyio.fail_after(5):
                    await upstream.first_call.wait()
                tg.cancel_scope.cancel()  # the client leaves while proxykit waits to retry
            with anyio.fail_after(5):  # the request ends now, not after the 30-60 s backoff
                while not any("status=499" in r.getMessage() for r in caplog.records):
                    await anyio.sleep(0.02)
    assert dict(upstream.calls) == {"sk-secret-0-500": 1}


async def test_remaining_zero_steers_the_next_request_away_without_a_429() -> None:
    upstream = KeyedUpstream(keys("dry", "ok"))
    async with keyed_proxy(upstream, routing={"strategy": "round-robin"}) as client:
        responses = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(4)]
    assert [r.status_code for r in responses] == [200] * 4
    assert dict(upstream.calls) == {"sk-secret-0-dry": 1, "sk-secret-1-ok": 3}


async def test_no_key_appears_in_logs_errors_headers_or_readiness(caplog: pytest.LogCaptureFixture) -> None:
    upstream = KeyedUpstream(keys("429", "401", "500"))
    seen = []
    with caplog.at_level(logging.DEBUG, logger="proxykit"):
        async with keyed_proxy(upstream) as client:
            for _ in range(3):
                response = await client.post("/v1/chat/completions", json=CHAT)
                seen += [response.text, str(response.headers)]
            seen.append((await client.get("/health/ready")).text)
    seen += [record.getMessage() for record in caplog.records]
    text = "\n".join(seen)
    for secret in upstream.behaviours:
        assert secret not in text
    assert "upstream key chat#0 is rate limited (429)" in text  # aliases are what logs show
