"""The management API under /api/llm: the seed's client unchanged, every route's shape, and who may
see what."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import requests

from proxykit import create_app
from proxykit.demo import DemoUpstream
from tests.conftest import in_process, serve, streamed

pytestmark = pytest.mark.anyio

ADMIN_KEY, TEAM_A, TEAM_B = "pk-admin-key-0000", "pk-team-a-key-1111", "pk-team-b-key-2222"
USAGE = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
MODELS = [
    {"name": "deepseek-ai/DeepSeek-V3", "priority": 2, "pricing": {"input_per_1m": 1.0, "output_per_1m": 2.0},
     "deployments": [{"base_url": "http://upstream.test/v1", "api_keys": ["sk-up-1", "sk-up-2"], "max_tokens": 8192},
                     {"base_url": "http://other.test/v1", "api_keys": ["sk-up-3"], "max_tokens": 4096}]},
    {"name": "small", "priority": 1, "deployments": [{"base_url": "http://upstream.test/v1", "api_keys": ["sk-up-4"]}]},
]


def management_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "models": copy.deepcopy(MODELS),
        "auth": {"keys": [{"name": "ops", "key": ADMIN_KEY, "admin": True},
                          {"name": "team-a", "key": TEAM_A, "budget": {"max_usd": 5, "period": "month"}},
                          {"name": "team-b", "key": TEAM_B}]},
        "store": {"url": f"sqlite:///{tmp_path / 'usage.db'}"},
    }
    config.update(overrides)
    return config


def answer(request: httpx.Request) -> httpx.Response:
    payload = json.loads(request.content)
    if payload.get("stream"):
        events = [b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
                  b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n', b"data: [DONE]\n\n"]
        return streamed(200, *events, headers={"content-type": "text/event-stream"})
    body = {"id": "c1", "model": payload["model"], "usage": USAGE,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}]}
    return streamed(200, json.dumps(body).encode(), headers={"content-type": "application/json"})


def key(secret: str) -> dict[str, str]:
    return {"x-api-key": secret}


class LLMClient:
    """The seed document's Python client (seeds/002), as its users wrote it."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.headers = {"X-API-Key": api_key, "Content-Type": "application/json"}

    def generate(self, model: str, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        payload = {"model": model, "messages": messages, "parameters": kwargs}
        response = requests.post(f"{self.base_url}/generate", headers=self.headers, json=payload)
        return response.json()

    def stream_generate(self, model: str, messages: list[dict[str, str]], **kwargs: Any) -> Iterator[Any]:
        payload = {"model": model, "messages": messages, "parameters": {**kwargs, "stream": True}}
        response = requests.post(f"{self.base_url}/generate/stream", headers=self.headers, json=payload, stream=True)
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                data = line[6:].decode("utf-8")
                if data != "[DONE]":
                    yield json.loads(data)


async def test_the_seed_client_works_unchanged_against_a_real_server(tmp_path: Path) -> None:
    config = management_config(tmp_path)
    async with serve(DemoUpstream(), lifespan="off") as upstream_url:
        for model in config["models"]:
            for deployment in model["deployments"]:
                deployment["base_url"] = f"{upstream_url}/v1"
        async with serve(create_app(config)) as proxy_url:
            client = LLMClient(f"{proxy_url}/api/llm", TEAM_A)
            result = await anyio.to_thread.run_sync(lambda: client.generate(
                model="deepseek-ai/DeepSeek-V3", messages=[{"role": "user", "content": "你好"}],
                temperature=0.7, max_tokens=100))
            chunks = await anyio.to_thread.run_sync(lambda: list(client.stream_generate(
                model="deepseek-ai/DeepSeek-V3", messages=[{"role": "user", "content": "寫一首詩"}], temperature=0.8)))
            async with httpx.AsyncClient(base_url=proxy_url) as http:
                usage = (await http.get("/api/llm/stats/usage", headers=key(TEAM_A))).json()
    assert result["choices"][0]["message"]["content"]
    cost = result["cost"]
    assert cost["total_cost"] == pytest.approx(cost["input_cost"] + cost["output_cost"]) and cost["total_cost"] > 0
    assert cost["input_cost"] == pytest.approx(result["usage"]["prompt_tokens"] * 1e-6)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk.get("choices"))
    assert text and len(chunks) > 2  # event by event
    assert usage["total_requests"] == 2
    assert usage["by_client"] == {"team-a": usage["by_model"]["deepseek-ai/DeepSeek-V3"]}


@pytest.fixture
async def api(tmp_path: Path) -> Any:
    app = create_app(management_config(tmp_path), transport=httpx.MockTransport(answer))
    async with in_process(app) as client:
        yield client


async def test_generate_goes_through_the_whole_stack_and_is_recorded(api: httpx.AsyncClient) -> None:
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "parameters": {"temperature": 0.2}}
    plain = await api.post("/api/llm/generate", json=body, headers=key(TEAM_B))
    streamed_too = await api.post("/api/llm/generate", headers=key(TEAM_B),
                                  json={**body, "parameters": {"stream": True}})
    refused = await api.post("/api/llm/generate", json=body)
    bad = await api.post("/api/llm/generate", json={"model": "small"}, headers=key(TEAM_B))
    budgeted = await api.post("/api/llm/generate/stream", json=body, headers=key(TEAM_A))
    rows = (await api.get("/api/llm/requests", headers=key(ADMIN_KEY))).json()["requests"]
    assert plain.status_code == 200 and plain.json()["cost"] == {"input_cost": 0, "output_cost": 0, "total_cost": 0}
    assert plain.headers["x-request-id"] and plain.headers["x-proxykit-attempts"].startswith("small#0:ok")
    assert streamed_too.headers["content-type"].startswith("text/event-stream")
    assert streamed_too.text.endswith("data: [DONE]\n\n")
    assert refused.status_code == 401 and bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    assert "x-proxykit-budget-remaining-usd" in budgeted.headers
    assert [(row["path"], row["status"], row["stream"]) for row in rows] == [
        ("/api/llm/generate/stream", 200, True), ("/api/llm/generate", 400, False),
        ("/api/llm/generate", 401, False), ("/api/llm/generate", 200, True), ("/api/llm/generate", 200, False)]


async def test_models_health_and_status(api: httpx.AsyncClient) -> None:
    models = (await api.get("/api/llm/models", headers=key(TEAM_B))).json()["models"]
    assert [model["id"] for model in models] == ["small", "deepseek-ai/DeepSeek-V3"]  # lowest priority first
    big = models[1]
    assert big["limits"] == {"max_tokens": 8192, "context_window": 8192}
    assert big["pricing"] == {"input_per_1m": 1.0, "output_per_1m": 2.0} and big["status"] == "available"
    assert big["provider"] == "upstream.test"
    await api.post("/v1/chat/completions", json={"model": "deepseek-ai/DeepSeek-V3", "messages": []},
                   headers=key(TEAM_B))
    status = (await api.get("/api/llm/models/deepseek-ai/DeepSeek-V3/status", headers=key(TEAM_B))).json()
    assert status["model_id"] == "deepseek-ai/DeepSeek-V3" and status["health"] == "healthy"
    assert status["keys"] == {"available": 3, "resting": 0, "set_aside": 0}
    assert status["error_rate"] == 0.0 and status["response_time_ms"] >= 0 and status["last_check"].endswith("Z")
    missing = await api.get("/api/llm/models/nope/status", headers=key(TEAM_B))
    assert missing.status_code == 404
    health = (await api.get("/api/llm/health", headers=key(TEAM_B))).json()
    assert health["status"] == "healthy" and health["timestamp"].endswith("Z")
    assert health["services"] == {"upstreams": "healthy", "store": "healthy", "limits": "healthy"}
    assert health["models"] == {"available": 2, "healthy": 2, "degraded": 0, "unavailable": 0}


async def test_usage_totals_by_model_and_client_with_dates_and_filters(api: httpx.AsyncClient) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for secret, model in ((TEAM_A, "deepseek-ai/DeepSeek-V3"), (TEAM_A, "small"), (TEAM_B, "small")):
        assert (await api.post("/v1/chat/completions", json={**chat, "model": model}, headers=key(secret))).is_success
    everything = (await api.get("/api/llm/stats/usage", headers=key(ADMIN_KEY))).json()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert everything["period"]["end"] == today
    assert (everything["total_requests"], everything["total_tokens"]) == (3, 90)
    assert everything["total_cost"] == pytest.approx(10e-6 + 40e-6)
    assert everything["by_model"]["small"] == {"requests": 2, "tokens": 60, "cost": 0.0}
    assert set(everything["by_client"]) == {"team-a", "team-b"}
    mine = (await api.get("/api/llm/stats/usage", headers=key(TEAM_B))).json()
    assert set(mine["by_client"]) == {"team-b"} and mine["total_requests"] == 1
    filtered = (await api.get("/api/llm/stats/usage", params={"model": "small", "client": "team-a"},
                              headers=key(ADMIN_KEY))).json()
    assert filtered["total_requests"] == 1
    past = (await api.get("/api/llm/stats/usage", params={"start_date": "2020-01-01", "end_date": "2020-01-31"},
                          headers=key(ADMIN_KEY))).json()
    assert past["total_requests"] == 0 and past["period"] == {"start": "2020-01-01", "end": "2020-01-31"}
    for params in ({"start_date": "yesterday"}, {"start_date": "2026-02-01", "end_date": "2026-01-01"},
                   {"end_date": "0001-01-02"}):
        bad = await api.get("/api/llm/stats/usage", params=params, headers=key(ADMIN_KEY))
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


async def test_performance_over_recent_requests(api: httpx.AsyncClient) -> None:
    for _ in range(4):
        await api.post("/v1/chat/completions", json={"model": "small", "messages": []}, headers=key(TEAM_A))
    await api.post("/v1/chat/completions", json={"model": "nope", "messages": []}, headers=key(TEAM_A))
    perf = (await api.get("/api/llm/stats/performance", params={"minutes": 5}, headers=key(TEAM_A))).json()
    assert perf["requests"] == 5 and perf["success_rate"] == 0.8 and perf["error_rate"] == 0.2
    times = perf["response_times"]
    assert 0 < times["p50_ms"] <= times["p95_ms"] <= times["p99_ms"] and times["average_ms"] > 0
    assert perf["throughput"] == {"requests_per_minute": 1.0, "tokens_per_minute": 24.0}
    assert set(perf["by_model"]) == {"small", "unknown"}
    assert perf["time_to_first_byte"]["p50_ms"] is not None
    only = (await api.get("/api/llm/stats/performance", params={"model": "small"}, headers=key(TEAM_A))).json()
    assert only["requests"] == 4
    bad = await api.get("/api/llm/stats/performance", params={"minutes": "0"}, headers=key(TEAM_A))
    assert bad.status_code == 400


async def test_requests_are_listed_newest_first_and_each_client_sees_its_own(api: httpx.AsyncClient) -> None:
    for secret, request_id in ((TEAM_A, "a-1"), (TEAM_B, "b-1"), (TEAM_A, "a-2")):
        await api.post("/v1/chat/completions", json={"model": "small", "messages": []},
                       headers={**key(secret), "x-request-id": request_id})
    listed = (await api.get("/api/llm/requests", headers=key(ADMIN_KEY))).json()["requests"]
    assert [row["request_id"] for row in listed] == ["a-2", "b-1", "a-1"]
    mine = (await api.get("/api/llm/requests", headers=key(TEAM_A))).json()["requests"]
    assert [row["request_id"] for row in mine] == ["a-2", "a-1"]
    assert (await api.get("/api/llm/requests", params={"limit": 1}, headers=key(ADMIN_KEY))).json()["requests"][0][
        "request_id"] == "a-2"
    since = (await api.get("/api/llm/requests", params={"since": str(time.time() + 60)},
                           headers=key(ADMIN_KEY))).json()["requests"]
    assert since == []
    iso_since = (await api.get("/api/llm/requests", params={"since": "2020-01-01T00:00:00Z", "client": "team-b"},
                               headers=key(ADMIN_KEY))).json()["requests"]
    assert [row["request_id"] for row in iso_since] == ["b-1"]
    other = await api.get("/api/llm/requests", params={"client": "team-b"}, headers=key(TEAM_A))
    assert other.status_code == 403 and other.json()["error"]["code"] == "admin_only"
    assert (await api.get("/api/llm/requests/b-1", headers=key(TEAM_A))).status_code == 404
    one = (await api.get("/api/llm/requests/b-1", headers=key(TEAM_B))).json()
    assert one["request_id"] == "b-1" and one["client"] == "team-b"
    assert (await api.get("/api/llm/requests/b-1", headers=key(ADMIN_KEY))).status_code == 200
    assert (await api.get("/api/llm/requests")).status_code == 401


async def test_with_auth_off_only_loopback_clients_are_answered(tmp_path: Path) -> None:
    config = management_config(tmp_path)
    del config["auth"]
    app = create_app(config, transport=httpx.MockTransport(answer))
    async with app.router.lifespan_context(app):
        for address, expected in ((("127.0.0.1", 5000), 200), (("::1", 5000), 200), (("10.1.2.3", 5000), 403)):
            transport = httpx.ASGITransport(app=app, client=address)
            async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
                response = await client.get("/api/llm/stats/usage")
                generated = await client.post("/api/llm/generate",
                                              json={"model": "small", "messages": [{"role": "user", "content": "x"}]})
            assert (response.status_code, generated.status_code) == (expected, expected)
            if expected == 403:
                assert response.json()["error"]["code"] == "admin_only"


async def test_a_management_path_of_its_own(tmp_path: Path) -> None:
    app = create_app(management_config(tmp_path, management={"path": "/ops/llm/"}),
                     transport=httpx.MockTransport(answer))
    async with in_process(app) as client:
        assert (await client.get("/ops/llm/health", headers=key(TEAM_A))).status_code == 200
        assert (await client.get("/api/llm/health", headers=key(TEAM_A))).status_code == 404
