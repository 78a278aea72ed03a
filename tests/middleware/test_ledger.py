"""Every finished LLM request becomes one row in the store: answered, refused, failed, left by its
client, served from the cache. Management reads, health and metrics do not; no secret ever does."""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from proxykit import create_app
from tests.conftest import (
    CHAT,
    CLIENT_KEY,
    UPSTREAM_KEYS,
    in_process,
    make_config,
    respx_proxy,
    serve,
    streamed,
    with_auth,
)
from tests.upstreams import WatchesDisconnect

pytestmark = pytest.mark.anyio

USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20,
         "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 3}}
# The deployment has a name of its own, so that no two of a row's names are the same.
PRICED = [{"name": "chat", "pricing": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "deployments": [
    {"name": "chat-east", "base_url": "http://upstream.test/v1", "model": "upstream-chat",
     "api_keys": list(UPSTREAM_KEYS)}]}]


def store_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    config = with_auth(make_config(models=copy.deepcopy(PRICED), store={"url": f"sqlite:///{tmp_path / 'usage.db'}"}))
    config.update(overrides)
    return config


async def rows(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """The store's rows, newest first, read through the management API as an admin would."""
    response = await client.get("/api/llm/requests", params={"limit": 100}, headers=ADMIN)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["requests"]
    return found


ADMIN_KEY = "pk-admin-secret-zzzz"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}


def with_admin(config: dict[str, Any]) -> dict[str, Any]:
    config["auth"]["keys"].append({"name": "ops", "key": ADMIN_KEY, "admin": True})
    return config


async def test_answered_refused_and_failed_requests_each_make_one_row(tmp_path: Path) -> None:
    config = with_admin(store_config(tmp_path))
    began = time.time()
    async with respx_proxy(config) as (router, client):
        router.post("/chat/completions").mock(side_effect=[
            streamed(200, json.dumps({"choices": [], "usage": USAGE}).encode(),
                     headers={"content-type": "application/json"}),
            *[streamed(500, b'{"error": {"message": "boom"}}') for _ in range(4)],
        ])
        ok = await client.post("/v1/chat/completions", json=CHAT, headers={**CLIENT, "x-request-id": "ok-1"})
        failed = await client.post("/chat/completions", json=CHAT, headers=CLIENT)  # no /v1: the same route
        unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=CLIENT)
        anonymous = await client.post("/v1/chat/completions", json=CHAT)
        await client.get("/v1/models", headers=CLIENT)  # not an LLM request: no row
        await client.get("/health")
        found = await rows(client)
    assert [ok.status_code, failed.status_code, unknown.status_code, anonymous.status_code] == [200, 500, 404, 401]
    assert [row["status"] for row in found] == [401, 404, 500, 200]
    answered = found[-1]
    assert answered == {
        "time": answered["time"], "request_id": "ok-1", "client": "team-a", "model": "chat", "served_model": "chat",
        "deployment": "chat-east", "key": answered["key"], "path": "/v1/chat/completions", "status": 200,
        "stream": False,
        "prompt_tokens": 12, "completion_tokens": 8, "reasoning_tokens": 3, "cached_tokens": 4,
        "cost_usd": pytest.approx(12 * 1e-6 + 8 * 2e-6), "duration_ms": answered["duration_ms"],
        "ttfb_ms": answered["ttfb_ms"], "attempts": 1, "cache": None,
    }
    assert answered["key"] in ("chat-east#0", "chat-east#1") and answered["time"].endswith("Z")
    assert began - 1 <= dt.datetime.fromisoformat(answered["time"]).timestamp() <= time.time()  # when it arrived
    assert answered["duration_ms"] >= answered["ttfb_ms"] > 0
    assert found[1]["model"] == "nope" and found[1]["served_model"] is None  # what the client asked for
    assert found[2]["attempts"] == 4 and found[2]["path"] == "/chat/completions"
    assert found[0]["client"] == "anonymous"


async def test_a_cache_hit_is_a_row_that_costs_nothing(tmp_path: Path) -> None:
    config = with_admin(store_config(tmp_path, cache={"enabled": True}))
    async with respx_proxy(config) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(
            200, json.dumps({"choices": [], "usage": USAGE}).encode(), headers={"content-type": "application/json"}))
        for _ in range(2):
            await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT)
        hit, miss = await rows(client)
    assert (miss["cache"], miss["attempts"], miss["cost_usd"] > 0) == ("miss", 1, True)
    assert (hit["cache"], hit["attempts"], hit["cost_usd"], hit["key"]) == ("hit", 0, 0.0, None)
    assert (hit["prompt_tokens"], hit["completion_tokens"]) == (12, 8)


async def test_a_stream_its_client_left_is_a_499_row_with_its_estimate(tmp_path: Path) -> None:
    upstream = WatchesDisconnect(events_first=3)
    async with serve(upstream, lifespan="off") as upstream_url:
        config = with_admin(store_config(tmp_path))
        config["models"][0]["deployments"][0]["base_url"] = f"{upstream_url}/v1"
        app = create_app(config)
        async with serve(app) as proxy_url, httpx.AsyncClient(base_url=proxy_url, timeout=10) as client:
            async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                                     headers=CLIENT) as response:
                async for _ in response.aiter_raw():
                    break  # the client leaves after the first chunk
            with anyio.fail_after(10):
                await upstream.disconnected.wait()
            with anyio.fail_after(10):
                while not (found := await rows(client)):
                    await anyio.sleep(0.05)
    (left,) = found
    assert (left["status"], left["stream"], left["client"]) == (499, True, "team-a")
    assert left["completion_tokens"] >= 1 and left["cost_usd"] > 0  # charged by the estimate


async def test_no_secret_reaches_the_database(tmp_path: Path) -> None:
    config = with_admin(store_config(tmp_path))
    async with respx_proxy(config) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, b"{}"))
        await client.post("/v1/chat/completions?api_key=sk-in-the-query-9999", json=CHAT, headers=CLIENT)
        await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-wrong-guess-8888"})
        assert len(await rows(client)) == 2
    data = b"".join(path.read_bytes() for path in tmp_path.glob("usage.db*"))
    assert data  # the file holds the rows
    for secret in (CLIENT_KEY, ADMIN_KEY, *UPSTREAM_KEYS, "sk-in-the-query-9999", "sk-wrong-guess-8888"):
        assert secret.encode() not in data


async def test_without_a_store_nothing_is_recorded_and_reads_say_so(tmp_path: Path) -> None:
    config = with_admin(store_config(tmp_path, store={"url": "none"}))
    async with respx_proxy(config) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, b"{}"))
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT)).status_code == 200
        response = await client.get("/api/llm/requests", headers=ADMIN)
    assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
    assert not list(tmp_path.glob("*.db"))


async def test_the_default_store_is_a_file_in_the_working_directory(tmp_path: Path) -> None:
    config = with_admin(with_auth(make_config(models=copy.deepcopy(PRICED))))
    async with respx_proxy(config) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, b"{}"))
        await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT)
        assert len(await rows(client)) == 1
    assert (tmp_path / "proxykit.db").exists()  # conftest runs each test in its own directory


async def test_rows_are_written_without_a_read_within_a_second_or_so(tmp_path: Path) -> None:
    config = with_admin(store_config(tmp_path))
    app = create_app(config, transport=httpx.MockTransport(lambda request: streamed(200, b"{}")))
    async with in_process(app) as client:
        await client.post("/v1/chat/completions", json=CHAT, headers=CLIENT)
        ledger = app.state.resources.ledger
        with anyio.fail_after(5):  # the writer's own cadence, not a read's flush
            while ledger.buffered:
                await anyio.sleep(0.05)
    assert (tmp_path / "usage.db").exists()
