"""`limits.backend: redis` with a real redis-server: one limit across processes, shared key rests,
and no request lost when Redis dies."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from proxykit import DemoUpstream
from tests.conftest import CHAT, ProxykitProcess, free_port, proxykit_process, serve
from tests.keyed_upstream import KeyedUpstream

pytestmark = pytest.mark.anyio

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS is None and not os.environ.get("CI"), reason="needs Debian's redis-server")
CLIENT = "pk-redis-client-secret"


@contextmanager
def redis_server(tmp_path: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    assert REDIS is not None
    port = port or free_port()
    process = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)  # a sync helper, run before the test's event loop has work
        client.close()
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.kill()
        process.wait()


def write_config(tmp_path: Path, upstream_url: str, redis_url: str, **overrides: Any) -> Path:
    config = {
        "auth": {"keys": [{"name": "shared", "key": CLIENT, "rpm": 10}]},
        "models": [{"name": "chat", "deployments": [{"base_url": f"{upstream_url}/v1", "api_keys": "k0,k1"}]}],
        "limits": {"backend": "redis", "redis_url": redis_url},
        "retry": {"backoff": {"initial": 0, "max": 0}},
        **overrides,
    }
    path = tmp_path / "proxykit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def two_proxies(stack: AsyncExitStack, tmp_path: Path, config: Path) -> list[ProxykitProcess]:
    return [await stack.enter_async_context(proxykit_process(tmp_path, "--config", str(config))) for _ in range(2)]


@needs_redis
async def test_two_processes_admit_one_rpm_limit_together(tmp_path: Path) -> None:
    with redis_server(tmp_path) as (redis_url, _):
        async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url, AsyncExitStack() as stack:
            proxies = await two_proxies(stack, tmp_path, write_config(tmp_path, upstream_url, redis_url))
            statuses: list[int] = []
            async with httpx.AsyncClient(headers={"x-api-key": CLIENT}) as client:

                async def send(url: str) -> None:
                    response = await client.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "chat"})
                    statuses.append(response.status_code)

                async with anyio.create_task_group() as tg:
                    for i in range(40):  # 4x the limit, spread over both processes at once
                        tg.start_soon(send, proxies[i % 2].url)
    assert set(statuses) <= {200, 429}
    assert 9 <= statuses.count(200) <= 11  # one global limit of 10, within ±1


@needs_redis
async def test_a_key_rested_by_one_process_is_avoided_by_the_other(tmp_path: Path) -> None:
    upstream = KeyedUpstream({"k0": "429", "k1": "ok"})
    with redis_server(tmp_path) as (redis_url, _):
        async with serve(upstream, lifespan="off") as upstream_url, AsyncExitStack() as stack:
            config = write_config(tmp_path, upstream_url, redis_url, routing={"strategy": "round-robin"})
            first, second = await two_proxies(stack, tmp_path, config)
            async with httpx.AsyncClient(headers={"x-api-key": CLIENT}) as client:
                rested = await client.post(f"{first.url}/v1/chat/completions", json=CHAT)
                with anyio.fail_after(10):  # the other replica syncs every second
                    while True:
                        ready = (await client.get(f"{second.url}/health/ready")).json()
                        if ready["models"]["chat"]["deployments"]["chat"]["resting"] == 1:
                            break
                        await anyio.sleep(0.1)
                avoided = await client.post(f"{second.url}/v1/chat/completions", json=CHAT)
    assert rested.headers["x-proxykit-attempts"] == "chat#0:http_429,chat#1:ok"
    assert avoided.headers["x-proxykit-attempts"] == "chat#1:ok"
    assert upstream.calls["k0"] == 1


@needs_redis
async def test_killing_redis_mid_run_loses_no_request(tmp_path: Path) -> None:
    with redis_server(tmp_path) as (redis_url, redis_process):
        async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
            config = write_config(tmp_path, upstream_url, redis_url,
                                  auth={"keys": [{"name": "shared", "key": CLIENT, "rpm": 1000}]})
            async with proxykit_process(tmp_path, "--config", str(config)) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url, headers={"x-api-key": CLIENT}) as client:
                    statuses = []
                    for i in range(30):
                        if i == 10:
                            redis_process.send_signal(signal.SIGKILL)
                            redis_process.wait()
                        response = await client.post("/v1/chat/completions", json={**CHAT, "model": "chat"})
                        statuses.append(response.status_code)
    assert statuses == [200] * 30
    assert proxy.output.count("Redis is unavailable") == 1
    assert "Traceback" not in proxy.output


@needs_redis
async def test_upstream_key_rpm_is_one_limit_across_processes(tmp_path: Path) -> None:
    upstream = KeyedUpstream({"k0": "ok", "k1": "ok"})
    with redis_server(tmp_path) as (redis_url, _):
        async with serve(upstream, lifespan="off") as upstream_url, AsyncExitStack() as stack:
            config = write_config(tmp_path, upstream_url, redis_url, auth=None, limits={
                "backend": "redis", "redis_url": redis_url, "queue_timeout": 0})
            raw = yaml.safe_load(config.read_text())
            del raw["auth"]
            raw["models"][0]["deployments"][0]["rpm"] = 2
            config.write_text(yaml.safe_dump(raw))
            proxies = await two_proxies(stack, tmp_path, config)
            async with httpx.AsyncClient() as client:
                statuses = [(await client.post(f"{proxies[i % 2].url}/v1/chat/completions", json=CHAT)).status_code
                            for i in range(8)]
    assert statuses.count(200) == 4  # 2 keys x 2 rpm, whichever process asked
    assert set(statuses) == {200, 503}
    assert dict(upstream.calls) == {"k0": 2, "k1": 2}


@needs_redis
async def test_redis_admission_is_all_or_nothing_and_buckets_expire(tmp_path: Path) -> None:
    import redis.asyncio

    from proxykit.limits.redis import PREFIX, RedisConnection, RedisRateLimiter

    with redis_server(tmp_path) as (redis_url, _):
        connection = RedisConnection(redis_url)
        limiter = RedisRateLimiter(connection)
        first = await limiter.admit_all([("t:requests", 1, 10), ("t:tokens", 90, 100)])
        refused = await limiter.admit_all([("t:requests", 1, 10), ("t:tokens", 20, 100)])
        after = await limiter.admit_all([("t:requests", 1, 10)])
        client = redis.asyncio.Redis.from_url(redis_url)
        ttl = await client.pttl(PREFIX + "t:tokens")
        await client.aclose()
        await connection.aclose()
    assert [a.allowed for a in first] == [True, True]
    assert [a.allowed for a in refused] == [True, False]
    assert refused[1].retry_after == pytest.approx(6.0, abs=0.2)  # 10 tokens over, at 100 a minute
    assert after[0].remaining == 8
    assert 0 < ttl <= 55_000  # the bucket expires once empty: nothing grows without bound
