"""The official openai SDK as a client of `proxykit serve`, in front of the demo upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from proxykit import DemoUpstream, create_app
from proxykit.demo import demo_config
from tests.conftest import ProxykitProcess, make_config, proxykit_process, serve
from tests.upstreams import BreaksOff, ResponsesApi

pytestmark = pytest.mark.anyio

CLIENT_KEY = "pk-sdk-client-secret-1"
LIMITED_KEY = "pk-sdk-client-secret-2"
UPSTREAM_KEYS = ["sk-sdk-upstream-secret-a", "sk-sdk-upstream-secret-b"]
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello SDK"}]


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[ProxykitProcess]:
    async with serve(DemoUpstream(delay=0.01), lifespan="off") as upstream_url:
        config = demo_config(f"{upstream_url}/v1")
        for model in config["models"]:
            model["deployments"][0]["api_keys"] = UPSTREAM_KEYS
        config["auth"] = {"keys": [
            {"name": "sdk", "key": CLIENT_KEY},
            {"name": "limited", "key": LIMITED_KEY, "models": ["demo-embed"]},
        ]}
        path = tmp_path / "proxykit.yaml"
        path.write_text(yaml.safe_dump(config))
        async with proxykit_process(tmp_path, "--config", str(path)) as process:
            yield process
    # Everything the proxy logged during the test, after it stopped: not one secret.
    for secret in (CLIENT_KEY, LIMITED_KEY, *UPSTREAM_KEYS):
        assert secret not in process.output
    assert "Traceback" not in process.output
    assert " POST /" in process.output  # the access log was written, and searched above


def sdk(proxy: ProxykitProcess, key: str = CLIENT_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0)


async def test_plain_completion(proxy: ProxykitProcess) -> None:
    async with sdk(proxy) as client:
        completion = await client.chat.completions.create(model="demo-chat", messages=HELLO)
    assert completion.choices[0].message.content == "Hello from the proxykit demo upstream. You said: Hello SDK"
    assert completion.usage is not None and completion.usage.total_tokens > 0


async def test_reasoning_content_passes_through(proxy: ProxykitProcess) -> None:
    async with sdk(proxy) as client:
        completion = await client.chat.completions.create(model="demo-reasoner", messages=HELLO)
    assert completion.choices[0].message.model_extra == {"reasoning_content": "The user wrote 2 words."}


async def test_streaming_completion(proxy: ProxykitProcess) -> None:
    async with sdk(proxy) as client:
        stream = await client.chat.completions.create(
            model="demo-chat", messages=HELLO, stream=True, stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the proxykit demo upstream. You said: Hello SDK"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_tool_calls(proxy: ProxykitProcess, stream: bool) -> None:
    async with sdk(proxy) as client:
        if stream:
            events = await client.chat.completions.create(
                model="demo-chat", messages=HELLO, tools=[WEATHER_TOOL], stream=True,
            )
            name, arguments = "", ""
            async for chunk in events:
                for call in chunk.choices[0].delta.tool_calls or []:
                    name += call.function.name or "" if call.function else ""
                    arguments += call.function.arguments or "" if call.function else ""
        else:
            completion = await client.chat.completions.create(
                model="demo-chat", messages=HELLO, tools=[WEATHER_TOOL],
            )
            calls = completion.choices[0].message.tool_calls
            assert calls is not None and completion.choices[0].finish_reason == "tool_calls"
            first_call = calls[0]
            assert isinstance(first_call, ChatCompletionMessageFunctionToolCall)
            name, arguments = first_call.function.name, first_call.function.arguments
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "demo"}


async def test_embeddings_and_models(proxy: ProxykitProcess) -> None:
    async with sdk(proxy, LIMITED_KEY) as client:
        embeddings = await client.embeddings.create(model="demo-embed", input=["a", "b"])
        models = [model.id async for model in client.models.list()]
        model = await client.models.retrieve("demo-embed")
    assert [len(item.embedding) for item in embeddings.data] == [8, 8]
    assert models == ["demo-embed"]
    assert model.id == "demo-embed"


@pytest.mark.parametrize(
    ("key", "model", "error"),
    [
        pytest.param("pk-wrong", "demo-chat", openai.AuthenticationError, id="bad-key"),
        pytest.param(CLIENT_KEY, "no-such-model", openai.NotFoundError, id="unknown-model"),
        pytest.param(LIMITED_KEY, "demo-chat", openai.PermissionDeniedError, id="not-allowed"),
    ],
)
async def test_proxy_errors_raise_the_sdk_own_types(
    proxy: ProxykitProcess, key: str, model: str, error: type[openai.APIStatusError]
) -> None:
    async with sdk(proxy, key) as client:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model=model, messages=HELLO)
    assert caught.value.request_id is None or isinstance(caught.value.request_id, str)
    body = caught.value.body
    assert isinstance(body, dict) and body["request_id"]


async def test_sdk_raises_on_a_stream_cut_upstream() -> None:
    async with serve(BreaksOff(events=2), lifespan="off") as upstream_url:
        async with serve(create_app(make_config(f"{upstream_url}/v1"))) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            async with client:
                stream = await client.chat.completions.create(model="chat", messages=HELLO, stream=True)
                received = []
                with pytest.raises(openai.APIError, match="stream broke off"):
                    async for chunk in stream:
                        received.append(chunk)
    assert len(received) == 2  # what came before the break still reached the client


async def test_responses_api_stream_reaches_the_sdk_and_its_usage_is_counted() -> None:
    # With metrics on, proxykit asks chat streams for usage; the Responses API would refuse that.
    async with serve(ResponsesApi(), lifespan="off") as upstream_url:
        async with serve(create_app(make_config(f"{upstream_url}/v1"))) as url:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
                stream = await client.responses.create(model="chat", input="Hello SDK", stream=True)
                events = [event async for event in stream]
            async with httpx.AsyncClient() as plain:
                metrics = (await plain.get(f"{url}/metrics")).text
    assert [event.type for event in events] == ["response.created", "response.output_text.delta", "response.completed"]
    completed = events[-1]
    assert completed.type == "response.completed" and completed.response.usage is not None
    assert completed.response.usage.input_tokens == 12
    for kind, count in (("prompt", 12), ("completion", 2), ("reasoning", 1)):
        assert f'proxykit_tokens_total{{client="anonymous",model="chat",type="{kind}"}} {count}.0' in metrics


async def test_a_base_url_without_v1_works_as_litellms_sdk_users_set_it(proxy: ProxykitProcess) -> None:
    # Seed 003: the LiteLLM SDK's api_base is the proxy's address with no /v1, as LiteLLM's proxy allows.
    async with openai.AsyncOpenAI(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0) as client:
        completion = await client.chat.completions.create(model="demo-chat", messages=HELLO)
        models = await client.models.list()
        chunks = [chunk async for chunk in await client.chat.completions.create(
            model="demo-chat", messages=HELLO, stream=True)]
    assert completion.choices[0].message.content
    assert "demo-chat" in {model.id for model in models.data}
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
