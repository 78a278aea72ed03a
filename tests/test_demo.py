"""The demo upstream on its own: deterministic, OpenAI-shaped, really streaming."""

from __future__ import annotations

import json

import httpx
import pytest

from proxykit import DemoUpstream

pytestmark = pytest.mark.anyio


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=DemoUpstream(delay=0)), base_url="http://demo")


async def test_chat_replies_are_deterministic() -> None:
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "same"}]}
    async with client() as http:
        first, second = [await http.post("/v1/chat/completions", json=body) for _ in range(2)]
    assert first.content == second.content
    assert first.json()["choices"][0]["message"]["content"].endswith("You said: same")


async def test_stream_joins_back_to_the_plain_reply_and_ends_with_done() -> None:
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "a b c"}]}
    async with client() as http:
        plain = (await http.post("/v1/chat/completions", json=body)).json()
        raw = (await http.post("/v1/chat/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}})).content
    events = [line.removeprefix(b"data: ") for line in raw.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


async def test_embeddings_have_the_asked_dimensions() -> None:
    async with client() as http:
        response = await http.post("/v1/embeddings", json={"model": "demo-embed", "input": "x", "dimensions": 4})
    assert len(response.json()["data"][0]["embedding"]) == 4


async def test_bad_json_is_a_400() -> None:
    async with client() as http:
        response = await http.post("/v1/chat/completions", content=b"[")
    assert response.status_code == 400


async def test_demo_flaky_model_rotates_past_its_rate_limited_key() -> None:
    from proxykit import create_app
    from proxykit.demo import demo_config
    from tests.conftest import serve

    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        proxy = create_app(demo_config(f"{upstream_url}/v1"))
        async with serve(proxy) as url, httpx.AsyncClient(base_url=url) as http:
            body = {"model": "demo-flaky", "messages": [{"role": "user", "content": "x"}]}
            first = await http.post("/v1/chat/completions", json=body)
            second = await http.post("/v1/chat/completions", json=body)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-proxykit-attempts"] == "demo-flaky#0:http_429,demo-flaky#1:ok"
    assert second.headers["x-proxykit-attempts"] == "demo-flaky#2:ok"  # the 429 key rests
