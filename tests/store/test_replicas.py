"""Two `proxykit serve` replicas sharing one real PostgreSQL: stats cover both, a budget both spend
holds within the documented overshoot, and a database outage fails no request and loses no row
that fits the buffer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from proxykit.demo import DemoUpstream, demo_config
from tests.conftest import ProxykitProcess, proxykit_process, serve
from tests.postgres import PASSWORD, PostgresServer

pytestmark = pytest.mark.anyio

ADMIN, CAPPED = "pk-ops-admin-0000", "pk-capped-team-1111"
HELLO = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
COST = 4 * 0.1e-6 + 9 * 0.4e-6  # the demo upstream's answer to "hi": 4 prompt and 9 completion tokens
BUDGET_REQUESTS = 40
RATE = 10.0  # requests a second each replica sends in the budget test


def replica_config(upstream_url: str, store_url: str) -> dict[str, Any]:
    config = demo_config(f"{upstream_url}/v1")
    config["auth"] = {"keys": [
        {"name": "ops", "key": ADMIN, "admin": True},
        {"name": "capped", "key": CAPPED, "budget": {"max_usd": BUDGET_REQUESTS * COST, "period": "day"}},
    ]}
    config["store"] = {"url": store_url}
    return config


@asynccontextmanager
async def replicas(tmp_path: Path, store_url: str, count: int = 2) -> AsyncIterator[list[ProxykitProcess]]:
    async with serve(DemoUpstream(), lifespan="off") as upstream_url, AsyncExitStack() as stack:
        path = tmp_path / "proxykit.yaml"
        path.write_text(json.dumps(replica_config(upstream_url, store_url)))  # JSON is YAML
        yield [await stack.enter_async_context(proxykit_process(tmp_path, "--config", str(path)))
               for _ in range(count)]


def admin(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)


async def test_stats_on_either_replica_cover_both(postgres: PostgresServer, tmp_path: Path) -> None:
    store_url = postgres.create_database("replicas_stats")
    async with replicas(tmp_path, store_url) as (one, two):
        async with admin(one.url) as first, admin(two.url) as second:
            for client, n in ((first, 3), (second, 5)):
                for _ in range(n):
                    assert (await client.post("/v1/chat/completions", json=HELLO)).status_code == 200
            await anyio.sleep(1.5)  # each replica's writer runs at least once a second
            seen = [(await client.get("/api/llm/stats/usage")).json() for client in (first, second)]
            rows = (await first.get("/api/llm/requests")).json()["requests"]
        outputs = one.output + two.output
    assert [usage["total_requests"] for usage in seen] == [8, 8]
    assert seen[0]["by_model"]["demo-chat"]["cost"] == pytest.approx(8 * COST)
    assert len(rows) == 8
    assert PASSWORD not in outputs and "store postgresql://127.0.0.1" in outputs  # the banner, without it


async def test_a_budget_spent_on_both_replicas_holds_within_the_overshoot(
    postgres: PostgresServer, tmp_path: Path,
) -> None:
    """Worst case (README): the budget, plus what is in flight, plus what the other replica spent
    in the last 2 s. Each replica sends one request at a time at RATE a second."""
    store_url = postgres.create_database("replicas_budget")
    admitted = [0, 0]

    async def spend(url: str, index: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers={"x-api-key": CAPPED}, timeout=30) as client:
            with anyio.move_on_after(30):  # bounded: the budget runs out in about 2 s
                refused_in_a_row = 0
                while refused_in_a_row < 30:  # refused for 3 s: the other replica's spend has arrived
                    response = await client.post("/v1/chat/completions", json=HELLO)
                    if response.status_code == 200:
                        admitted[index] += 1
                        refused_in_a_row = 0
                    else:
                        assert response.json()["error"]["code"] == "budget_exceeded"
                        refused_in_a_row += 1
                    await anyio.sleep(1 / RATE)

    async with replicas(tmp_path, store_url) as (one, two):
        async with anyio.create_task_group() as group:
            group.start_soon(spend, one.url, 0)
            group.start_soon(spend, two.url, 1)
        await anyio.sleep(1.5)
        async with admin(one.url) as client:
            spent = (await client.get("/api/llm/stats/usage", params={"client": "capped"})).json()["total_cost"]
    total = sum(admitted)
    overshoot_bound = 2 * 1 + 2 * int(2 * RATE)  # one in flight each, and 2 s of the other replica's requests
    print(f"budget test: admitted {admitted}, {total - BUDGET_REQUESTS} over a budget of {BUDGET_REQUESTS}")
    assert BUDGET_REQUESTS <= total <= BUDGET_REQUESTS + overshoot_bound, admitted
    assert spent == pytest.approx(total * COST)


async def test_an_outage_of_postgresql_fails_no_request_and_loses_no_row(tmp_path: Path) -> None:
    from tests.postgres import postgres_server

    with postgres_server() as database:  # its own server: this test stops it
        store_url = database.create_database("outage")
        async with replicas(tmp_path, store_url, count=1) as (proxy,):
            async with admin(proxy.url) as client:
                statuses = [(await client.post("/v1/chat/completions", json=HELLO)).status_code for _ in range(10)]
                await anyio.sleep(1.5)
                await anyio.to_thread.run_sync(database.stop)
                statuses += [(await client.post("/v1/chat/completions", json=HELLO)).status_code for _ in range(20)]
                down = (await client.get("/api/llm/health")).json()["services"]["store"]
                unavailable = await client.get("/api/llm/stats/usage")
                await anyio.sleep(1.5)
                await anyio.to_thread.run_sync(database.start)
                with anyio.fail_after(20):
                    while (usage := await client.get("/api/llm/stats/usage")).status_code != 200 or \
                            usage.json()["total_requests"] < 30:
                        await anyio.sleep(0.2)
                metrics = (await client.get("/metrics")).text
            output = proxy.output
    assert statuses == [200] * 30
    assert down == "unhealthy" and unavailable.status_code == 503
    assert unavailable.json()["error"]["code"] == "store_unavailable"
    assert usage.json()["total_requests"] == 30
    assert 'proxykit_store_records_total{result="written"} 30.0' in metrics
    assert "usage store unavailable" in output and PASSWORD not in output


async def test_a_management_write_on_one_replica_reaches_the_other(postgres: PostgresServer, tmp_path: Path) -> None:
    store_url = postgres.create_database("replicas_overrides")
    async with replicas(tmp_path, store_url) as (one, two):
        async with admin(one.url) as first, admin(two.url) as second:
            put = await first.put("/api/llm/config/models/demo-chat", json={"enabled": False})
            key = await first.put("/api/llm/config/keys/demo-reasoner%230", json={"enabled": False})
            assert put.json()["persisted"] is True and key.json()["persisted"] is True
            with anyio.fail_after(4):  # every replica reads the store's overrides each second
                while (await second.post("/v1/chat/completions", json=HELLO)).status_code != 503:
                    await anyio.sleep(0.1)
            ready = (await second.get("/health/ready")).json()["models"]["demo-reasoner"]["deployments"]
            setting = (await second.get("/api/llm/config/models/demo-chat")).json()
            await second.delete("/api/llm/config/overrides")
            with anyio.fail_after(4):
                while (await first.post("/v1/chat/completions", json=HELLO)).status_code != 200:
                    await anyio.sleep(0.1)
    assert setting["enabled"] is False
    assert ready["demo-reasoner"]["reasons"] == {"disabled": 1}
