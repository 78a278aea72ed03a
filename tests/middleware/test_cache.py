"""The response cache (CONTRACT section 10): hits with the bytes the client got live, keys, the
request's Cache-Control, TTL, errors never stored, the byte bound, single-flight, and Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from starlette.types import Message, Receive, Scope, Send

from proxykit import DemoUpstream, create_app
from proxykit.cache.base import CacheEntry
from proxykit.cache.memory import MemoryCache
from proxykit.demo import demo_config
from tests.conftest import CHAT, CLIENT_KEY, OTHER_CLIENT_KEY, make_config, proxykit_process, serve
from tests.limits.test_redis import needs_redis, redis_server
from tests.raw_upstream import peak_rss_kib
from tests.upstreams import read_body

pytestmark = pytest.mark.anyio

CACHE_ON = {"enabled": True}


class Counting:
    """An upstream answering each POST with its call number (so a hit is told from a miss), after
    `delay` seconds; `status` answers instead of 200 while it is set."""

    def __init__(self, *, delay: float = 0.0, size: int = 0) -> None:
        self.calls = 0
        self.delay = delay
        self.size = size
        self.status = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        self.calls += 1
        await anyio.sleep(self.delay)
        body = json.dumps({"call": self.calls, "pad": "x" * self.size,
                           "usage": {"prompt_tokens": 5, "completion_tokens": 7}}).encode()
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"), (b"x-ratelimit-remaining-requests", b"9")]})
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def cached_proxy(upstream: Any, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(upstream, lifespan="off") as upstream_url:
        config = make_config(f"{upstream_url}/v1", cache={**CACHE_ON, **overrides.pop("cache", {})}, **overrides)
        async with serve(create_app(config)) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client


async def test_a_hit_answers_the_same_bytes_without_an_upstream_call() -> None:
    upstream = Counting()
    async with cached_proxy(upstream) as client:
        miss = await client.post("/v1/chat/completions", json=CHAT)
        hit = await client.post("/chat/completions", json=CHAT)  # without /v1: the same entry
        metrics = (await client.get("/metrics")).text
    assert upstream.calls == 1
    assert (miss.headers["x-proxykit-cache"], hit.headers["x-proxykit-cache"]) == ("miss", "hit")
    assert hit.content == miss.content and hit.status_code == 200
    assert hit.headers["x-proxykit-attempts"] == "cache" and int(hit.headers["age"]) >= 0
    assert "x-ratelimit-remaining-requests" not in hit.headers  # not the upstream's headers of that time
    assert 'proxykit_cache_requests_total{model="chat",result="hit"} 1.0' in metrics
    assert 'proxykit_cache_saved_tokens_total{model="chat"} 12.0' in metrics


async def test_keys_ignore_member_order_but_not_stream_model_body_or_client() -> None:
    upstream = Counting()
    auth = {"keys": [{"name": "a", "key": CLIENT_KEY}, {"name": "b", "key": OTHER_CLIENT_KEY}]}
    async with cached_proxy(upstream, auth=auth) as client:
        a, b = {"authorization": f"Bearer {CLIENT_KEY}"}, {"authorization": f"Bearer {OTHER_CLIENT_KEY}"}
        first = await client.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [], "n": 1}',
                                  headers=a)
        reordered = await client.post("/v1/chat/completions", content=b'{"n": 1, "messages": [], "model": "chat"}',
                                      headers=a)
        other_body = await client.post("/v1/chat/completions", json={"model": "chat", "messages": [], "n": 2},
                                       headers=a)
        other_client = await client.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [], "n": 1}',
                                         headers=b)
    assert first.headers["x-proxykit-cache"] == "miss"
    assert reordered.headers["x-proxykit-cache"] == "hit"
    assert other_body.headers["x-proxykit-cache"] == "miss"
    assert other_client.headers["x-proxykit-cache"] == "miss"  # clients apart by default
    assert upstream.calls == 3


async def test_shared_entries_serve_every_client() -> None:
    upstream = Counting()
    auth = {"keys": [{"name": "a", "key": CLIENT_KEY}, {"name": "b", "key": OTHER_CLIENT_KEY}]}
    async with cached_proxy(upstream, auth=auth, cache={"shared_between_clients": True}) as client:
        await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {CLIENT_KEY}"})
        other = await client.post("/v1/chat/completions", json=CHAT,
                                  headers={"authorization": f"Bearer {OTHER_CLIENT_KEY}"})
    assert other.headers["x-proxykit-cache"] == "hit"
    assert upstream.calls == 1


async def test_cache_control_no_cache_no_store_and_max_age() -> None:
    upstream = Counting()
    async with cached_proxy(upstream) as client:
        stored = await client.post("/v1/chat/completions", json=CHAT, headers={"cache-control": "no-cache"})
        hit = await client.post("/v1/chat/completions", json=CHAT)
        bypass = await client.post("/v1/chat/completions", json=CHAT, headers={"cache-control": "no-store"})
        await anyio.sleep(1.1)
        too_old = await client.post("/v1/chat/completions", json=CHAT, headers={"cache-control": "max-age=1"})
        young_enough = await client.post("/v1/chat/completions", json=CHAT, headers={"cache-control": "max-age=60"})
    assert [r.headers["x-proxykit-cache"] for r in (stored, hit, bypass, too_old, young_enough)] == [
        "miss", "hit", "bypass", "miss", "hit"]
    assert upstream.calls == 3  # no-cache, no-store and the too-old one went upstream
    assert young_enough.json()["call"] == 3  # the too-old miss stored its fresh answer


async def test_entries_expire_after_their_ttl() -> None:
    upstream = Counting()
    async with cached_proxy(upstream, cache={"ttl": 0.5}) as client:
        await client.post("/v1/chat/completions", json=CHAT)
        await anyio.sleep(0.7)
        again = await client.post("/v1/chat/completions", json=CHAT)
    assert again.headers["x-proxykit-cache"] == "miss"
    assert upstream.calls == 2


async def test_errors_are_never_stored() -> None:
    upstream = Counting()
    upstream.status = 500
    async with cached_proxy(upstream, retry={"attempts": 0}) as client:
        failed = await client.post("/v1/chat/completions", json=CHAT)
        upstream.status = 200
        answered = await client.post("/v1/chat/completions", json=CHAT)
        hit = await client.post("/v1/chat/completions", json=CHAT)
    assert (failed.status_code, failed.headers["x-proxykit-cache"]) == (500, "miss")
    assert (answered.status_code, answered.headers["x-proxykit-cache"]) == (200, "miss")
    assert hit.headers["x-proxykit-cache"] == "hit"
    assert upstream.calls == 2


async def test_identical_misses_at_once_make_one_upstream_call() -> None:
    upstream = Counting(delay=0.5)
    async with cached_proxy(upstream) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(5)))
    assert upstream.calls == 1
    assert len({response.content for response in responses}) == 1
    assert sorted(r.headers["x-proxykit-cache"] for r in responses) == ["hit"] * 4 + ["miss"]


async def test_a_stream_is_replayed_event_by_event_as_the_client_got_it() -> None:
    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        config = demo_config(f"{upstream_url}/v1")
        config["cache"] = CACHE_ON
        app = create_app(config)
        body = {"model": "demo-chat", "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
        async with app.router.lifespan_context(app):
            first, first_chunks = await asgi_post(app, body)
            second, second_chunks = await asgi_post(app, body)
            with_usage, usage_chunks = await asgi_post(app, {**body, "stream_options": {"include_usage": True}})
    assert first["x-proxykit-cache"] == "miss" and second["x-proxykit-cache"] == "hit"
    assert second_chunks == first_chunks  # byte for byte, message for message
    assert len(second_chunks) > 3  # separate events, not one chunk
    assert not any(b'"usage"' in chunk and b'"choices":[]' in chunk.replace(b" ", b"") for chunk in second_chunks)
    assert with_usage["x-proxykit-cache"] == "hit"  # stream_options is not in the key...
    assert any(b'"usage"' in chunk for chunk in usage_chunks)  # ...and the usage event comes to who asks
    assert usage_chunks[-1].endswith(b"data: [DONE]\n\n")


async def asgi_post(app: Any, body: dict[str, Any]) -> tuple[dict[str, str], list[bytes]]:
    """The response of one POST, called straight over ASGI: its headers, and its body messages."""
    messages: list[Message] = []
    incoming = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> Message:
        if incoming:
            return incoming.pop()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 2)}
    with anyio.fail_after(10):
        await app(scope, receive, send)
    headers = {name.decode(): value.decode() for name, value in messages[0]["headers"]}
    return headers, [message["body"] for message in messages[1:] if message.get("body")]


async def test_the_openai_sdk_reads_a_streamed_hit() -> None:
    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        config = demo_config(f"{upstream_url}/v1")
        config["cache"] = CACHE_ON
        async with serve(create_app(config)) as url:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
                texts = []
                for _ in range(2):
                    stream = await client.chat.completions.create(
                        model="demo-chat", stream=True, messages=[{"role": "user", "content": "Hi"}])
                    texts.append("".join([chunk.choices[0].delta.content or "" async for chunk in stream
                                          if chunk.choices]))
    assert texts[0] and texts[0] == texts[1]


async def test_entries_pack_into_one_bytes_object_and_back() -> None:
    entry = CacheEntry(status=200, content_type=b"text/event-stream", chunks=(b"data: 1\n\n", b"", b"data: [DONE]\n\n"),
                       stream=True, prompt_tokens=5, completion_tokens=7)
    assert CacheEntry.unpack(entry.pack()) == entry
    assert CacheEntry.unpack(b"not an entry") is None
    assert CacheEntry.unpack(entry.pack()[:-1]) is None  # cut short: refused, never misread


async def test_memory_entries_leave_least_recently_used_first_within_the_byte_bound() -> None:
    cache = MemoryCache(max_bytes=100_000)
    entry = CacheEntry(status=200, content_type=b"application/json", chunks=(b"x" * 9_000,), stream=False,
                       prompt_tokens=1, completion_tokens=0)
    for i in range(30):
        await cache.set(f"k{i}", entry.pack(), 60)
        await cache.get("k0")  # used all along: stays
    assert cache.bytes <= 100_000
    assert await cache.get("k0") is not None
    assert await cache.get("k1") is None  # the least recently used left first
    assert await cache.get("k29") is not None
    big = CacheEntry(status=200, content_type=b"", chunks=(b"x" * 20_000,), stream=False, prompt_tokens=0,
                     completion_tokens=0)
    await cache.set("big", big.pack(), 60)  # over a tenth of the bound: not stored
    assert await cache.get("big") is None


@needs_redis
async def test_two_replicas_share_entries_through_redis(tmp_path: Path) -> None:
    upstream = Counting()
    with redis_server(tmp_path) as (redis_url, _):
        async with serve(upstream, lifespan="off") as upstream_url:
            config = make_config(f"{upstream_url}/v1", cache={**CACHE_ON, "backend": "redis"},
                                 limits={"redis_url": redis_url})
            async with serve(create_app(config)) as first, serve(create_app(config)) as second:
                async with httpx.AsyncClient(timeout=30) as client:
                    miss = await client.post(f"{first}/v1/chat/completions", json=CHAT)
                    hit = await client.post(f"{second}/v1/chat/completions", json=CHAT)
    assert (miss.headers["x-proxykit-cache"], hit.headers["x-proxykit-cache"]) == ("miss", "hit")
    assert hit.content == miss.content
    assert upstream.calls == 1


async def test_a_client_not_allowed_the_model_gets_no_shared_answer() -> None:
    upstream = Counting()
    auth = {"keys": [{"name": "a", "key": CLIENT_KEY}, {"name": "b", "key": OTHER_CLIENT_KEY, "models": ["other-*"]}]}
    async with cached_proxy(upstream, auth=auth, cache={"shared_between_clients": True}) as client:
        await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {CLIENT_KEY}"})
        refused = await client.post("/v1/chat/completions", json=CHAT,
                                    headers={"authorization": f"Bearer {OTHER_CLIENT_KEY}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"


async def test_many_distinct_answers_stay_within_the_byte_bound_in_a_real_server(tmp_path: Path) -> None:
    upstream = Counting(size=80_000)  # 800 answers of 80 KB: 64 MB if nothing left
    async with serve(upstream, lifespan="off") as upstream_url:
        config = make_config(f"{upstream_url}/v1", cache={**CACHE_ON, "max_bytes": 2_000_000})
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps(config))
        async with proxykit_process(tmp_path, "--config", str(path), "--log-level", "warning") as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
                await client.post("/v1/chat/completions", json=CHAT)
                before = peak_rss_kib(proxy.process.pid)
                for n in range(800):
                    await client.post("/v1/chat/completions", json={**CHAT, "n": n})
                growth = peak_rss_kib(proxy.process.pid) - before
                oldest = await client.post("/v1/chat/completions", json={**CHAT, "n": 0})
                newest = await client.post("/v1/chat/completions", json={**CHAT, "n": 799})
    assert growth < 24 * 1024
    assert oldest.headers["x-proxykit-cache"] == "miss"  # evicted long ago
    assert newest.headers["x-proxykit-cache"] == "hit"


async def test_litellms_sdk_called_twice_gets_the_second_answer_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of LiteLLM's price list
    import litellm

    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        config = demo_config(f"{upstream_url}/v1")
        config["cache"] = CACHE_ON
        async with serve(create_app(config)) as url, httpx.AsyncClient() as client:
            # Seed 003's call: LiteLLM's SDK, api_base without /v1, an OpenAI-compatible proxy.
            answers = [
                await litellm.acompletion(model="openai/demo-chat", api_base=url, api_key="unused", num_retries=0,
                                          messages=[{"role": "user", "content": "Hello"}])
                for _ in range(2)
            ]
            metrics = (await client.get(f"{url}/metrics")).text
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert 'proxykit_cache_requests_total{model="demo-chat",result="miss"} 1.0' in metrics
    assert 'proxykit_cache_requests_total{model="demo-chat",result="hit"} 1.0' in metrics
