"""The management API's config writes: checked like the file, applied at once, kept in the store
on top of the file across reloads and restarts, and admin-only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxykit import create_app
from tests.conftest import CHAT, in_process, streamed

pytestmark = pytest.mark.anyio

ADMIN, USER = "pk-overrides-admin", "pk-overrides-user"


def file_config(
    tmp_path: Path, *, store: str | None = None, models: tuple[str, ...] = ("chat", "spare"),
) -> dict[str, Any]:
    return {
        "models": [{"name": name, "deployments": [{"base_url": "http://upstream.test/v1", "name": name,
                                                    "api_keys": [f"sk-{name}-0", f"sk-{name}-1"]}]}
                   for name in models],
        "auth": {"keys": [{"name": "ops", "key": ADMIN, "admin": True}, {"name": "user", "key": USER}]},
        "store": {"url": store or f"sqlite:///{tmp_path / 'usage.db'}"},
    }


class Upstream:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.keys: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        self.keys.append(request.headers["authorization"])
        return streamed(200, b'{"usage": {"total_tokens": 2}}', headers={"content-type": "application/json"})


def admin() -> dict[str, str]:
    return {"x-api-key": ADMIN}


async def test_a_model_put_changes_only_what_it_names_and_applies_at_once(tmp_path: Path) -> None:
    upstream = Upstream()
    app = create_app(file_config(tmp_path), transport=httpx.MockTransport(upstream))
    async with in_process(app) as client:
        put = await client.put("/api/llm/config/models/chat", headers=admin(), json={
            "parameters": {"default_temperature": 0.2, "max_tokens": 64}, "fallback_models": ["spare"],
            "rate_limit": {"requests_per_minute": 2}})
        again = await client.put("/api/llm/config/models/chat", headers=admin(), json={"priority": 5})
        got = (await client.get("/api/llm/config/models/chat", headers=admin())).json()
        statuses = [(await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": USER})).status_code
                    for _ in range(3)]
        await client.put("/api/llm/config/models/chat", headers=admin(), json={"enabled": False})
        disabled = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": USER})
    assert put.status_code == 200 and put.json()["persisted"] is True
    assert again.json()["parameters"] == {"default_temperature": 0.2, "max_tokens": 64}  # kept
    assert got == {"enabled": True, "priority": 5, "rate_limit": {"requests_per_minute": 2, "tokens_per_minute": None},
                   "fallback_models": ["spare"], "parameters": {"default_temperature": 0.2, "max_tokens": 64}}
    assert statuses == [200, 200, 429]  # the model's own rpm
    assert (upstream.bodies[0]["temperature"], upstream.bodies[0]["max_tokens"]) == (0.2, 64)
    assert disabled.status_code == 503 and disabled.json()["error"]["code"] == "model_unavailable"


async def test_a_bad_put_names_the_field_and_changes_nothing(tmp_path: Path) -> None:
    app = create_app(file_config(tmp_path), transport=httpx.MockTransport(Upstream()))
    async with in_process(app) as client:
        bad = [await client.put("/api/llm/config/models/chat", headers=admin(), json=body) for body in (
            {"enabled": "no"}, {"fallback_models": ["nope"]}, {"fallback_models": ["chat"]},
            {"rate_limit": {"requests_per_minute": 0}}, {"colour": "blue"}, [1, 2])]
        balancing = await client.put("/api/llm/config/load-balancing", headers=admin(),
                                     json={"strategy": "fastest", "failure_threshold": 0})
        missing = await client.put("/api/llm/config/models/nope", headers=admin(), json={"enabled": False})
        user = await client.put("/api/llm/config/models/chat", headers={"x-api-key": USER}, json={"priority": 1})
        user_get = await client.get("/api/llm/config/load-balancing", headers={"x-api-key": USER})
        after = (await client.get("/api/llm/config/models/chat", headers=admin())).json()
    assert [response.status_code for response in bad] == [400] * 6
    messages = [response.json()["error"]["message"] for response in bad]
    assert messages[0].startswith("enabled:") and "'nope'" in messages[1] and "itself" in messages[2]
    assert messages[3].startswith("rate_limit.requests_per_minute") and messages[4].startswith("colour:")
    assert balancing.status_code == 400 and "strategy" in balancing.text and "failure_threshold" in balancing.text
    assert missing.status_code == 404
    assert user.status_code == 403 and user.json()["error"]["code"] == "admin_only" and user_get.status_code == 403
    assert after["enabled"] is True and after["fallback_models"] == []


async def test_load_balancing_and_a_disabled_key(tmp_path: Path) -> None:
    upstream = Upstream()
    app = create_app(file_config(tmp_path), transport=httpx.MockTransport(upstream))
    async with in_process(app) as client:
        balancing = await client.put("/api/llm/config/load-balancing", headers=admin(), json={
            "strategy": "round_robin", "health_check_interval": 10, "failure_threshold": 4,
            "recovery_threshold": 1, "weights": {"chat": 3}})
        key = await client.put("/api/llm/config/keys/chat%231", headers=admin(), json={"enabled": False})
        for _ in range(4):
            await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": USER})
        ready = (await client.get("/health/ready")).json()["models"]["chat"]["deployments"]["chat"]
        metrics = (await client.get("/metrics")).text
        unknown = await client.put("/api/llm/config/keys/nope%230", headers=admin(), json={"enabled": False})
    assert balancing.json() == {"strategy": "round-robin", "health_check_interval": 10, "failure_threshold": 4,
                                "recovery_threshold": 1, "weights": {"chat": 3.0, "spare": 1.0}, "persisted": True}
    assert app.state.proxykit.config.routing.strategy == "round-robin"
    assert key.json() == {"alias": "chat#1", "enabled": False, "persisted": True}
    assert set(upstream.keys) == {"Bearer sk-chat-0"}  # the disabled key is never used
    assert ready["reasons"] == {"disabled": 1} and ready["available"] == 1
    assert 'proxykit_upstream_key_available{deployment="chat",key="chat#1"} 0.0' in metrics
    assert unknown.status_code == 404


async def test_overrides_outlive_reloads_and_restarts_and_clear_back_to_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    config = file_config(tmp_path)
    app = create_app(config, transport=httpx.MockTransport(Upstream()))
    async with in_process(app) as client:
        await client.put("/api/llm/config/models/spare", headers=admin(), json={"enabled": False})
        with caplog.at_level(logging.WARNING, logger="proxykit.live"):
            app.state.proxykit.reload(file_config(tmp_path, models=("chat",)))  # the file drops spare
        assert "override of model 'spare' ignored" in caplog.text
        app.state.proxykit.reload(config)  # spare is back: so is its override
        assert app.state.proxykit.config.model("spare").enabled is False
    restarted = create_app(config, transport=httpx.MockTransport(Upstream()))
    async with in_process(restarted) as client:
        assert restarted.state.proxykit.config.model("spare").enabled is False  # from the store, at start
        cleared = await client.delete("/api/llm/config/overrides", headers=admin())
        assert restarted.state.proxykit.config.model("spare").enabled is True
    assert cleared.json() == {"overrides": "cleared", "persisted": True}


async def test_without_a_store_a_change_holds_for_this_process_only(tmp_path: Path) -> None:
    app = create_app(file_config(tmp_path, store="none"), transport=httpx.MockTransport(Upstream()))
    async with in_process(app) as client:
        put = await client.put("/api/llm/config/models/chat", headers=admin(), json={"priority": 3})
    assert put.json()["persisted"] is False and put.json()["priority"] == 3
