"""Client rpm/tpm limits and upstream key limits, with the in-memory backend."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import CHAT, respx_proxy, serve, streamed
from tests.keyed_upstream import KeyedUpstream

pytestmark = pytest.mark.anyio

A, B = "pk-limited-client-a", "pk-other-client-b"


def limited_config(**limits: Any) -> dict[str, Any]:
    return {
        "auth": {"keys": [{"name": "limited", "key": A, **limits}, {"name": "other", "key": B, "rpm": 1000}]},
        "models": [{"name": "chat", "deployments": [{"base_url": "http://upstream.test/v1", "api_keys": "k1,k2"}]}],
    }


def usage_body(total: int) -> bytes:
    return json.dumps({"choices": [], "usage": {"prompt_tokens": total // 2, "completion_tokens": total - total // 2,
                                                "total_tokens": total}}).encode()


async def test_rpm_admits_exactly_the_limit_then_429_and_others_are_unaffected() -> None:
    async with respx_proxy(limited_config(rpm=5)) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, b"{}"))
        limited = [await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": A}) for _ in range(7)]
        other = [await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": B}) for _ in range(7)]
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in limited] == [200] * 5 + [429] * 2
    assert [r.status_code for r in other] == [200] * 7
    refused = limited[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 12  # one request of a 5 rpm bucket: 12 s
    assert [r.headers["x-ratelimit-remaining-requests"] for r in limited[:5]] == ["4", "3", "2", "1", "0"]
    assert limited[0].headers["x-ratelimit-limit-requests"] == "5"
    assert limited[0].headers["x-ratelimit-reset-requests"].endswith("s")
    assert 'proxykit_rate_limited_total{client="limited",limit="rpm"} 2.0' in metrics


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_tpm_is_enforced_from_real_usage(stream: bool) -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        if stream:
            events = [b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n',
                      b"data: " + usage_body(60) + b"\n\n", b"data: [DONE]\n\n"]
            return streamed(200, *events, headers={"content-type": "text/event-stream"})
        return streamed(200, usage_body(60), headers={"content-type": "application/json"})

    async with respx_proxy(limited_config(tpm=100)) as (router, client):
        router.post("/chat/completions").mock(side_effect=reply)
        body = {**CHAT, "stream": stream}
        responses = [await client.post("/v1/chat/completions", json=body, headers={"x-api-key": A}) for _ in range(3)]
    # Reservations alone (~20 tokens each) would admit all three; the real usage (60 each) does not.
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in responses[2].json()["error"]["message"]


async def test_unused_reservation_is_given_back() -> None:
    async with respx_proxy(limited_config(tpm=1000)) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, usage_body(10)))
        big = {**CHAT, "max_tokens": 900}  # reserves ~900, uses 10
        statuses = [(await client.post("/v1/chat/completions", json=big, headers={"x-api-key": A})).status_code
                    for _ in range(5)]
    assert statuses == [200] * 5


async def test_max_tokens_is_reserved_up_front() -> None:
    async with respx_proxy(limited_config(tpm=1000)) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, usage_body(10)))
        small = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100}, headers={"x-api-key": A})
        # ~1,200 tokens reserved could never fit 1,000 a minute, whatever the answer would use.
        large = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1200}, headers={"x-api-key": A})
    assert (small.status_code, large.status_code) == (200, 429)
    assert "tokens per minute" in large.json()["error"]["message"]


async def test_full_upstream_keys_queue_then_503() -> None:
    upstream = KeyedUpstream({"sk-q-1": "ok", "sk-q-2": "ok", "sk-q-3": "ok"})
    async with serve(upstream, lifespan="off") as upstream_url:
        from proxykit import create_app

        config = {"models": [{"name": "chat", "deployments": [
            {"base_url": f"{upstream_url}/v1", "api_keys": list(upstream.behaviours), "rpm": 2}]}],
            "limits": {"queue_timeout": 0.3}}
        async with serve(create_app(config)) as url, httpx.AsyncClient(base_url=url) as client:
            results: list[httpx.Response] = []

            async def one() -> None:
                results.append(await client.post("/v1/chat/completions", json=CHAT))

            async with anyio.create_task_group() as tg:
                for _ in range(7):
                    tg.start_soon(partial(one))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 6 + [503]
    assert sorted(upstream.calls.values()) == [2, 2, 2]
    refused = next(r for r in results if r.status_code == 503)
    assert "at their rpm/tpm limit" in refused.json()["error"]["message"]


async def test_a_max_tokens_of_400_digits_is_refused_as_too_many_not_a_crash() -> None:
    async with respx_proxy(limited_config(tpm=1000)) as (router, client):
        route = router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, usage_body(10)))
        huge = await client.post(
            "/v1/chat/completions", content=b'{"model": "chat", "max_tokens": ' + b"9" * 400 + b"}",
            headers={"x-api-key": A, "content-type": "application/json"},
        )
        after = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": A})
    assert huge.status_code == 429
    assert huge.json()["error"]["code"] == "rate_limit_exceeded"
    assert after.status_code == 200  # nothing was spent by the refused one
    assert len(route.calls) == 1


async def test_an_upstream_usage_of_400_digits_settles_as_nothing() -> None:
    huge = b'{"choices": [], "usage": {"prompt_tokens": ' + b"9" * 400 + b', "total_tokens": ' + b"9" * 400 + b"}}"
    async with respx_proxy(limited_config(tpm=1000)) as (router, client):
        router.post("/chat/completions").mock(side_effect=[streamed(200, huge), streamed(200, usage_body(10))])
        first = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": A})
        second = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": A})
    assert (first.status_code, second.status_code) == (200, 200)
