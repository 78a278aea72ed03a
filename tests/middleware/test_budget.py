"""Client budgets: spend from the store plus what this process has not written yet, refused at
admission with 429 budget_exceeded, a header with what is left, and no request cut short."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from proxykit import create_app
from tests.conftest import CHAT, UPSTREAM_KEYS, in_process, make_config, respx_proxy, serve, streamed
from tests.upstreams import GatedStream

pytestmark = pytest.mark.anyio

CAPPED, FREE = "pk-capped-client-1111", "pk-free-client-2222"
USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
COST = 12 * 1e-6 + 8 * 2e-6  # per request, at the prices below
MODELS = [{"name": "chat", "pricing": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "deployments": [
    {"base_url": "http://upstream.test/v1", "api_keys": list(UPSTREAM_KEYS)}]}]


def budget_config(tmp_path: Path, max_usd: float, period: str = "day") -> dict[str, Any]:
    return make_config(
        models=copy.deepcopy(MODELS), store={"url": f"sqlite:///{tmp_path / 'usage.db'}"},
        auth={"keys": [{"name": "capped", "key": CAPPED, "budget": {"max_usd": max_usd, "period": period}},
                       {"name": "free", "key": FREE}]},
    )


def answer(request: httpx.Request) -> httpx.Response:
    body = json.dumps({"choices": [], "usage": USAGE}).encode()
    return streamed(200, body, headers={"content-type": "application/json"})


async def test_a_spent_budget_is_refused_until_the_period_ends(tmp_path: Path) -> None:
    async with respx_proxy(budget_config(tmp_path, max_usd=COST * 2.5)) as (router, client):
        router.post("/chat/completions").mock(side_effect=answer)
        capped = [await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CAPPED})
                  for _ in range(4)]
        free = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": FREE})
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in capped] == [200, 200, 200, 429]
    remaining = [float(r.headers["x-proxykit-budget-remaining-usd"]) for r in capped]
    assert remaining == pytest.approx([COST * 2.5, COST * 1.5, COST * 0.5, 0.0], abs=1e-6)
    error = capped[3].json()["error"]
    assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
    now = dt.datetime.now(dt.UTC)
    to_midnight = (dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC) - now).total_seconds()
    assert abs(int(capped[3].headers["retry-after"]) - to_midnight) < 60
    assert free.status_code == 200 and "x-proxykit-budget-remaining-usd" not in free.headers
    assert 'proxykit_budget_rejected_total{client="capped"} 1.0' in metrics
    assert len(router.calls) == 4  # the refused request never went upstream


async def test_a_total_budget_has_no_retry_after(tmp_path: Path) -> None:
    async with respx_proxy(budget_config(tmp_path, max_usd=COST / 2, period="total")) as (router, client):
        router.post("/chat/completions").mock(side_effect=answer)
        first = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CAPPED})
        second = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CAPPED})
    assert (first.status_code, second.status_code) == (200, 429)
    assert "retry-after" not in second.headers


async def test_the_spend_outlives_a_restart(tmp_path: Path) -> None:
    config = budget_config(tmp_path, max_usd=COST * 1.5, period="month")
    async with respx_proxy(config) as (router, client):
        router.post("/chat/completions").mock(side_effect=answer)
        first = [(await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CAPPED})).status_code
                 for _ in range(2)]
    app = create_app(config, transport=httpx.MockTransport(answer))
    async with in_process(app) as client:  # a new process: the spend comes from the store
        after = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CAPPED})
    assert first == [200, 200] and after.status_code == 429


class PricedGatedStream(GatedStream):
    """A gated stream whose last gate sends a usage event before `[DONE]`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_usage(message: Message) -> None:
            if message.get("body") == b"data: [DONE]\n\n":
                usage = b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n"
                message = {**message, "body": usage + message["body"]}
            await send(message)

        await super().__call__(scope, receive, with_usage)


async def test_requests_admitted_under_the_budget_finish_even_past_it(tmp_path: Path) -> None:
    """The overshoot: requests in flight were admitted with budget left, and are never cut off."""
    upstream = PricedGatedStream(events=2)
    async with serve(upstream, lifespan="off") as upstream_url:
        config = budget_config(tmp_path, max_usd=1e-9)
        config["models"][0]["deployments"][0]["base_url"] = f"{upstream_url}/v1"
        async with serve(create_app(config)) as proxy_url, httpx.AsyncClient(base_url=proxy_url, timeout=10) as client:
            body = {**CHAT, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-api-key": CAPPED}) as one:
                assert one.status_code == 200
                chunks = one.aiter_raw()
                upstream.release(0)
                await chunks.__anext__()
                # The first stream has spent the budget by its estimate once it ends; a second is
                # admitted while the first is still in flight (nothing spent yet).
                async with client.stream("POST", "/v1/chat/completions", json=body,
                                         headers={"x-api-key": CAPPED}) as two:
                    assert two.status_code == 200
                    upstream.release(1)
                    upstream.release(2)
                    rest_two = b"".join([chunk async for chunk in two.aiter_raw()])
                rest_one = b"".join([chunk async for chunk in chunks])
            assert rest_two.endswith(b"data: [DONE]\n\n") and rest_one.endswith(b"data: [DONE]\n\n")
            with anyio.fail_after(5):
                while (late := await client.post("/v1/chat/completions", json=CHAT,
                                                  headers={"x-api-key": CAPPED})).status_code != 429:
                    await anyio.sleep(0.05)
    assert late.json()["error"]["code"] == "budget_exceeded"


async def test_budgets_need_a_store() -> None:
    config = make_config(store={"url": "none"},
                         auth={"keys": [{"name": "capped", "key": CAPPED, "budget": {"max_usd": 1}}]})
    with pytest.raises(Exception, match=r"auth.keys\[0\].budget: needs a store"):
        create_app(config)


async def test_the_budget_route_shows_spend_and_the_reset(tmp_path: Path) -> None:
    config = budget_config(tmp_path, max_usd=1.0, period="week")
    app = create_app(config, transport=httpx.MockTransport(answer))
    async with in_process(app) as client:
        await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CAPPED})
        mine = (await client.get("/api/llm/stats/budgets", headers={"x-api-key": CAPPED})).json()
        others = (await client.get("/api/llm/stats/budgets", headers={"x-api-key": FREE})).json()
    entry = mine["budgets"]["capped"]
    assert entry["max_usd"] == 1.0 and entry["period"] == "week"
    assert entry["spent_usd"] == pytest.approx(COST) and entry["remaining_usd"] == pytest.approx(1.0 - COST)
    resets = dt.datetime.fromisoformat(entry["resets_at"].replace("Z", "+00:00"))
    assert resets.weekday() == 0 and resets.hour == 0 and resets > dt.datetime.now(dt.UTC)
    assert others == {"budgets": {}}  # not an admin, no budget of its own
