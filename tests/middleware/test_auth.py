"""Client authentication, alone in a Starlette stack and inside the full app."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxykit import AuthMiddleware, get_context
from proxykit.config import ClientKey
from tests.conftest import (
    CHAT,
    CLIENT_KEY,
    OTHER_CLIENT_KEY,
    in_process,
    make_config,
    respx_proxy,
    streamed,
    with_auth,
)

pytestmark = pytest.mark.anyio


def whoami_app() -> Starlette:
    async def whoami(request: Request) -> JSONResponse:
        ctx = get_context(request.scope)
        if ctx is None:  # an open path: auth did not look at this request
            return JSONResponse({"client": None})
        return JSONResponse({"client": ctx.client, "models": ctx.allowed_models})

    keys = [ClientKey(name="team-a", key="secret-a"), ClientKey(name="team-b", key="secret-b", models=("x-*",))]
    return Starlette(
        routes=[Route("/whoami", whoami), Route("/health", whoami)],
        middleware=[Middleware(AuthMiddleware, keys=keys, open_paths={"/health"})],
    )


@pytest.mark.parametrize(
    ("headers", "status", "client"),
    [
        pytest.param({"authorization": "Bearer secret-a"}, 200, "team-a", id="bearer"),
        pytest.param({"authorization": "bearer   secret-b"}, 200, "team-b", id="bearer-any-case"),
        pytest.param({"x-api-key": "secret-a"}, 200, "team-a", id="x-api-key"),
        pytest.param({}, 401, None, id="missing"),
        pytest.param({"authorization": "Bearer secret-"}, 401, None, id="prefix-of-a-key"),
        pytest.param({"authorization": "Basic secret-a"}, 401, None, id="wrong-scheme"),
        pytest.param({"x-api-key": "nope"}, 401, None, id="wrong"),
    ],
)
async def test_auth_middleware_alone(headers: dict[str, str], status: int, client: str | None) -> None:
    async with in_process(whoami_app()) as http:
        response = await http.get("/whoami", headers=headers)
    assert response.status_code == status
    if client:
        assert response.json()["client"] == client
    else:
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert "secret" not in response.text


async def test_open_paths_need_no_key() -> None:
    async with in_process(whoami_app()) as http:
        response = await http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"client": None}


async def test_allow_list_refuses_other_models_with_403() -> None:
    async with respx_proxy(with_auth(make_config())) as (router, client):
        route = router.post("/chat/completions").mock(return_value=streamed(200, b"{}"))
        allowed = await client.post("/v1/chat/completions", json=CHAT,
                                    headers={"authorization": f"Bearer {CLIENT_KEY}"})
        refused = await client.post("/v1/chat/completions", json=CHAT,
                                    headers={"authorization": f"Bearer {OTHER_CLIENT_KEY}"})
    assert allowed.status_code == 200
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert len(route.calls) == 1


async def test_model_list_shows_only_what_the_key_may_use() -> None:
    config = with_auth(make_config())
    config["models"].append({"name": "other-model", "deployments": [
        {"base_url": "http://upstream.test/v1", "api_keys": "k", "max_tokens": 1024}]})
    async with respx_proxy(config) as (_, client):
        everything = await client.get("/v1/models", headers={"authorization": f"Bearer {CLIENT_KEY}"})
        limited = await client.get("/v1/models", headers={"x-api-key": OTHER_CLIENT_KEY})
        one = await client.get("/v1/models/other-model", headers={"x-api-key": OTHER_CLIENT_KEY})
        hidden = await client.get("/v1/models/chat", headers={"x-api-key": OTHER_CLIENT_KEY})
        anonymous = await client.get("/v1/models")
    assert [m["id"] for m in everything.json()["data"]] == ["chat", "other-model"]
    assert limited.json() == {"object": "list", "data": [
        {"id": "other-model", "object": "model", "created": 0, "owned_by": "proxykit", "max_tokens": 1024}]}
    assert one.json()["id"] == "other-model"
    assert hidden.status_code == 404
    assert anonymous.status_code == 401


async def test_health_needs_no_key_when_auth_is_on() -> None:
    async with respx_proxy(with_auth(make_config())) as (_, client):
        health = await client.get("/health")
        ready = await client.get("/health/ready")
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    counts = ready.json()["models"]["chat"]["deployments"]["chat"]
    assert (counts["available"], counts["resting"], counts["set_aside"]) == (2, 0, 0)


async def test_client_key_never_goes_upstream() -> None:
    async with respx_proxy(with_auth(make_config())) as (router, client):
        route = router.post("/chat/completions").mock(return_value=streamed(200, b"{}"))
        await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CLIENT_KEY})
    sent = route.calls.last.request
    assert CLIENT_KEY not in str(sent.headers.raw) and CLIENT_KEY.encode() not in sent.content


async def test_unauthenticated_request_body_is_never_read() -> None:
    body_read = False

    async def body() -> httpx.AsyncByteStream:  # type: ignore[misc]
        nonlocal body_read
        body_read = True
        yield b"{}"

    async with respx_proxy(with_auth(make_config())) as (_, client):
        response = await client.post("/v1/chat/completions", content=body())
    assert response.status_code == 401
    assert not body_read
