"""The forwarding endpoint against a respx upstream: what goes up, what comes back."""

from __future__ import annotations

import json

import httpx
import pytest
import respx
from starlette.applications import Starlette
from starlette.routing import Mount

from proxykit import Forwarder, Resources, config_from_dict, create_app
from tests.conftest import CHAT, UPSTREAM_KEYS, in_process, make_config, respx_proxy, serve, streamed
from tests.raw_upstream import raw_request

pytestmark = pytest.mark.anyio

UPSTREAM_BODY = (
    b'{"id":"x","choices":[{"message":{"role":"assistant","content":"ok","reasoning_content":"hm",'
    b'"tool_calls":[]}}],"usage":{"prompt_tokens":1},"field_nobody_knows":[1,2]}'
)


async def test_request_goes_upstream_with_upstream_model_and_key() -> None:
    async with respx_proxy(make_config()) as (router, client):
        route = router.post("/chat/completions").mock(return_value=streamed(200, UPSTREAM_BODY))
        response = await client.post(
            "/v1/chat/completions?api-version=2", json=CHAT,
            headers={"authorization": "Bearer client-credential", "x-api-key": "client-credential",
                     "connection": "keep-alive, x-hop", "x-hop": "1", "keep-alive": "timeout=5",
                     "x-custom": "kept", "openai-organization": "org-1"},
        )
    assert response.status_code == 200
    sent = route.calls.last.request
    assert sent.url == "http://upstream.test/v1/chat/completions?api-version=2"
    assert json.loads(sent.content) == {**CHAT, "model": "upstream-chat"}
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEYS[0]}"
    assert "client-credential" not in str(sent.headers.raw)
    for hop in ("x-hop", "keep-alive", "connection"):
        assert hop not in sent.headers
    assert sent.headers["x-custom"] == "kept"
    assert sent.headers["openai-organization"] == "org-1"


async def test_body_is_sent_unchanged_when_model_ids_match() -> None:
    config = make_config()
    config["models"][0]["deployments"][0]["model"] = "chat"
    raw = b'{"model": "chat",   "messages": [], "extra": {"keep": "spacing"}}'
    async with respx_proxy(config) as (router, client):
        route = router.post("/chat/completions").mock(return_value=streamed(200, b"{}"))
        await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert route.calls.last.request.content == raw


async def test_upstream_answer_reaches_client_byte_for_byte() -> None:
    upstream_headers = {
        "content-type": "application/json", "x-ratelimit-remaining-requests": "41",
        "x-request-id": "upstream-id-7", "server": "upstream-server", "x-weird": "yes",
    }
    async with respx_proxy(make_config()) as (router, client):
        router.post("/chat/completions").mock(
            return_value=streamed(201, UPSTREAM_BODY[:20], UPSTREAM_BODY[20:], headers=upstream_headers)
        )
        response = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "client-id-1"})
    assert response.status_code == 201
    assert response.content == UPSTREAM_BODY
    assert response.headers["x-ratelimit-remaining-requests"] == "41"
    assert response.headers["x-weird"] == "yes"
    assert response.headers["x-request-id"] == "client-id-1"
    assert response.headers["x-upstream-request-id"] == "upstream-id-7"
    assert "upstream-server" not in response.headers.get_list("server")
    assert response.headers["x-proxykit-attempts"] == "chat#0:ok"


async def test_request_id_is_made_and_sent_upstream_when_client_has_none() -> None:
    async with respx_proxy(make_config()) as (router, client):
        route = router.post("/chat/completions").mock(return_value=streamed(200, b"{}"))
        response = await client.post("/v1/chat/completions", json=CHAT)
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32
    assert route.calls.last.request.headers["x-request-id"] == request_id


@pytest.mark.parametrize(("status", "calls"), [(400, 1), (422, 1), (500, 4)])
async def test_upstream_error_passes_through_as_it_came(status: int, calls: int) -> None:
    error = b'{"error":{"message":"prompt too long","type":"invalid_request_error"}}'
    config = make_config(retry={"backoff": {"initial": 0}})
    async with respx_proxy(config) as (router, client):
        route = router.post("/chat/completions").mock(side_effect=lambda request: streamed(status, error))
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == status
    assert response.content == error
    # A 500 is retried on both keys, 1 + retry.attempts calls in all; a 4xx is the client's fault.
    assert len(route.calls) == calls
    assert (response.headers.get("x-should-retry") == "false") is (calls > 1)


async def test_keys_are_taken_in_turn() -> None:
    async with respx_proxy(make_config()) as (router, client):
        route = router.post("/embeddings").mock(side_effect=lambda request: streamed(200, b"{}"))
        for _ in range(4):
            await client.post("/v1/embeddings", json={"model": "chat", "input": "x"})
    used = [call.request.headers["authorization"] for call in route.calls]
    assert used == [f"Bearer {key}" for key in UPSTREAM_KEYS * 2]


async def test_deployments_alternate_and_each_gets_its_own_model_id() -> None:
    config = make_config()
    config["models"][0]["deployments"].append(
        {"base_url": "http://upstream.test/v1/second", "model": "second-model", "api_keys": "sk-second-key"}
    )
    async with respx_proxy(config) as (router, client):
        first = router.post("/chat/completions").mock(return_value=streamed(200, b"{}"))
        second = router.post("/second/chat/completions").mock(return_value=streamed(200, b"{}"))
        responses = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(2)]
    assert json.loads(first.calls.last.request.content)["model"] == "upstream-chat"
    assert json.loads(second.calls.last.request.content)["model"] == "second-model"
    assert [r.headers["x-proxykit-attempts"] for r in responses] == ["chat@0#0:ok", "chat@1#0:ok"]


async def test_keyless_deployment_sends_no_authorization() -> None:
    config = make_config()
    del config["models"][0]["deployments"][0]["api_keys"]
    async with respx_proxy(config) as (router, client):
        route = router.post("/chat/completions").mock(return_value=streamed(200, b"{}"))
        await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer mine"})
    assert "authorization" not in route.calls.last.request.headers


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param(b"{not json", 400, "invalid_request", id="not-json"),
        pytest.param(b"[1, 2]", 400, "invalid_request", id="not-an-object"),
        pytest.param(b'{"messages": []}', 400, "invalid_request", id="no-model"),
        pytest.param(b'{"model": 42}', 400, "invalid_request", id="model-not-a-string"),
        pytest.param(b"", 400, "invalid_request", id="empty"),
        pytest.param(b'{"model": "nope"}', 404, "model_not_found", id="unknown-model"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors(body: bytes, status: int, code: str) -> None:
    async with respx_proxy(make_config()) as (_, client):
        response = await client.post("/v1/chat/completions", content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"] and error["type"]


async def test_body_over_the_limit_is_refused_by_content_length() -> None:
    async with respx_proxy(make_config(limits={"max_body_bytes": 100})) as (_, client):
        response = await client.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 200})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_chunked_body_over_the_limit_is_refused_while_reading() -> None:
    async def chunks() -> httpx.AsyncByteStream:  # type: ignore[misc]
        for _ in range(10):
            yield b"x" * 50

    async with respx_proxy(make_config(limits={"max_body_bytes": 100})) as (_, client):
        response = await client.post("/v1/chat/completions", content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("error", "status", "code", "outcome"),
    [
        pytest.param(httpx.ConnectError("refused"), 502, "upstream_error", "connect_error", id="connect"),
        pytest.param(httpx.ConnectTimeout("slow"), 502, "upstream_error", "connect_error", id="connect-timeout"),
        pytest.param(httpx.ReadTimeout("slow"), 504, "upstream_timeout", "timeout", id="read-timeout"),
        pytest.param(httpx.RemoteProtocolError("bad"), 502, "upstream_error", "connect_error", id="protocol"),
    ],
)
async def test_upstream_failures_before_an_answer_are_mapped(
    error: Exception, status: int, code: str, outcome: str
) -> None:
    async with respx_proxy(make_config(retry={"attempts": 0})) as (router, client):
        router.post("/chat/completions").mock(side_effect=error)
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.headers["x-proxykit-attempts"] == f"chat#0:{outcome}"
    assert "upstream.test" not in response.text


async def test_unknown_route_and_method_get_openai_shaped_errors() -> None:
    async with respx_proxy(make_config()) as (_, client):
        missing = await client.get("/nowhere")
        wrong_method = await client.post("/health")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_fields_named_by_every_connection_header_stay_behind() -> None:
    async with respx_proxy(make_config()) as (router, client):
        route = router.post("/chat/completions").mock(return_value=streamed(200, UPSTREAM_BODY))
        await client.post("/v1/chat/completions", json=CHAT, headers=[
            ("connection", "x-first"), ("connection", "x-second"), ("x-first", "1"), ("x-second", "2"),
            ("x-kept", "3")])
    sent = route.calls.last.request.headers
    assert "x-first" not in sent and "x-second" not in sent
    assert sent["x-kept"] == "3"


@pytest.mark.parametrize("path", [
    pytest.param(b"/v1/../../internal/admin", id="dots"),
    pytest.param(b"/v1/%2e%2e/%2e%2e/internal/admin", id="encoded-dots"),
    pytest.param(b"/v1/..%2f..%2finternal/admin", id="encoded-slash"),
    pytest.param(b"/v1/%252e%252e/internal/admin", id="double-encoded"),
    pytest.param(b"/v1/chat/.\\..\\admin", id="backslash"),
])
async def test_a_path_leaving_base_url_is_refused_and_nothing_goes_upstream(path: bytes) -> None:
    # A real server, and the request target sent as written: httpx would normalise the dots away.
    router = respx.MockRouter(using=None)  # no route: anything sent upstream would fail
    app = create_app(make_config(), transport=httpx.MockTransport(router.async_handler))
    async with serve(app) as url:
        body = json.dumps(CHAT).encode()
        answer = await raw_request(url, b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (path, len(body), body))
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_request"
    assert len(router.calls) == 0


async def test_a_body_nested_50000_deep_is_a_400() -> None:
    async with respx_proxy(make_config()) as (router, client):  # no route: anything sent upstream fails
        body = b'{"model": "chat", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
        response = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert len(router.calls) == 0
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["error"]["message"]


@pytest.mark.parametrize("options", ["yes", 1, True, ["include_usage"]])
async def test_a_stream_options_that_is_not_an_object_goes_up_untouched(options: object) -> None:
    async with respx_proxy(make_config()) as (router, client):
        route = router.post("/chat/completions").mock(
            return_value=streamed(400, b'{"error": {"message": "stream_options must be an object"}}'))
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": options})
    assert response.status_code == 400  # the upstream's own answer, passed through
    assert json.loads(route.calls.last.request.content)["stream_options"] == options


@pytest.mark.parametrize("size", [pytest.param(100, id="small"), pytest.param(200_000, id="large")])
async def test_an_upstream_error_that_echoes_the_key_reaches_the_client_with_its_alias(size: int) -> None:
    secret = UPSTREAM_KEYS[0]
    echo = b'{"error": {"message": "Incorrect API key provided: ' + secret.encode() + b'", "pad": "'
    body = echo + b"x" * size + b" " + secret.encode() + b'"}}'
    config = make_config(retry={"attempts": 0})
    async with respx_proxy(config) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(401, *[
            body[i:i + 7000] for i in range(0, len(body), 7000)]))  # a key may be split across pieces
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    assert secret not in response.text
    assert response.text.count("chat#0") == 2
    assert len(response.content) == len(body) - 2 * (len(secret) - len("chat#0"))


async def test_the_forwarder_alone_chooses_by_the_pool_and_rests_a_key_that_got_a_429() -> None:
    router = respx.MockRouter(assert_all_called=True, base_url="http://upstream.test/v1", using=None)
    keys_used: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        keys_used.append(request.headers["authorization"])
        if request.headers["authorization"] == f"Bearer {UPSTREAM_KEYS[0]}":
            return streamed(429, b'{"error": {"message": "slow down"}}', headers={"retry-after": "30"})
        return streamed(200, b'{"ok": true}')

    router.post("/chat/completions").mock(side_effect=answer)
    config = config_from_dict(make_config(routing={"strategy": "round-robin"}))
    resources = Resources(config, transport=httpx.MockTransport(router.async_handler))
    app = Starlette(routes=[Mount("/v1", app=Forwarder(resources))], lifespan=resources.lifespan)
    async with in_process(app) as client:
        statuses = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(4)]
    assert statuses == [429, 200, 200, 200]  # no retry layer: the 429 goes out, and its key rests
    assert keys_used == [f"Bearer {UPSTREAM_KEYS[0]}"] + [f"Bearer {UPSTREAM_KEYS[1]}"] * 3


async def test_openai_routes_are_served_without_v1_too() -> None:
    async with respx_proxy(make_config()) as (router, client):
        route = router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, b'{"ok": true}'))
        embeddings = router.post("/embeddings").mock(side_effect=lambda request: streamed(200, b'{"data": []}'))
        chat = await client.post("/chat/completions", json=CHAT)
        embedded = await client.post("/embeddings", json={"model": "chat", "input": "hi"})
        models = await client.get("/models")
        nowhere = await client.get("/nowhere")
    assert (chat.status_code, embedded.status_code) == (200, 200)
    assert route.calls.last.request.url.path == "/v1/chat/completions"  # under the deployment's base_url
    assert embeddings.called
    assert [entry["id"] for entry in models.json()["data"]] == ["chat"]
    assert nowhere.status_code == 404


@pytest.mark.parametrize(("auth_header", "expected"), [
    pytest.param("x-api-key", UPSTREAM_KEYS[0], id="anthropic"),
    pytest.param("api-key", UPSTREAM_KEYS[0], id="azure"),
    pytest.param("authorization", f"Bearer {UPSTREAM_KEYS[0]}", id="openai"),
])
async def test_the_key_goes_in_the_deployments_auth_header_with_its_static_headers(
    auth_header: str, expected: str
) -> None:
    config = make_config()
    config["models"][0]["deployments"][0].update(
        auth_header=auth_header, headers={"anthropic-version": "2023-06-01"}, api_keys=[UPSTREAM_KEYS[0]])
    async with respx_proxy(config) as (router, client):
        route = router.post("/messages").mock(side_effect=lambda request: streamed(200, b'{"ok": true}'))
        response = await client.post(
            "/v1/messages", json=CHAT, headers={"anthropic-version": "2020-01-01", "x-api-key": "client-secret"})
    sent = route.calls.last.request.headers
    assert response.status_code == 200
    assert sent[auth_header] == expected
    assert sent["anthropic-version"] == "2023-06-01"  # the deployment's, not the client's
    other_headers = {"authorization", "x-api-key", "api-key"} - {auth_header}
    assert not other_headers & set(sent)  # the client's credentials never go up
