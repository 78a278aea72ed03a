"""Live configuration: a new config takes effect for new requests while requests in flight finish
on theirs; state of the names that stay carries over; an invalid file changes nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from proxykit import create_app
from proxykit.config import ConfigError
from tests.conftest import CHAT, in_process, proxykit_process, serve, streamed
from tests.upstreams import SSE_HEADERS, event, read_body

pytestmark = pytest.mark.anyio

CLIENT = "pk-live-client-0000"


class SlowStream:
    """Streams `events` events `gap` seconds apart, then `[DONE]`; plain requests get a usage body."""

    def __init__(self, events: int = 40, gap: float = 0.1) -> None:
        self.events, self.gap = events, gap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = json.loads(await read_body(receive) or b"{}")
        if not body.get("stream"):
            answer = json.dumps({"model": body.get("model"), "choices": [], "usage": {"total_tokens": 2}}).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": answer})
            return
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for n in range(self.events):
            await send({"type": "http.response.body", "body": event(n), "more_body": True})
            await anyio.sleep(self.gap)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def live_config(upstream_url: str, *, models: tuple[str, ...] = ("chat",), strategy: str = "round-robin",
                keys: tuple[str, ...] = ("sk-a", "sk-b"), rpm: int = 1000) -> dict[str, Any]:
    return {
        "models": [{"name": name, "deployments": [{"base_url": f"{upstream_url}/v1", "api_keys": list(keys)}]}
                   for name in models],
        "auth": {"keys": [{"name": "team", "key": CLIENT, "rpm": rpm}]},
        "routing": {"strategy": strategy},
        "store": {"url": "none"},
    }


def write_atomically(path: Path, config: dict[str, Any]) -> None:
    """As editors and deploy tools do: a new file renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(config))  # JSON is YAML
    os.replace(temporary, path)


async def model_ids(client: httpx.AsyncClient) -> set[str]:
    return {model["id"] for model in (await client.get("/v1/models")).json()["data"]}


async def wait_for(client: httpx.AsyncClient, check: Any, *, within: float = 3.0) -> None:
    """A change must reach new requests within 2 s (the file is looked at every second)."""
    with anyio.fail_after(within):
        while not await check(client):
            await anyio.sleep(0.05)


async def test_reload_in_process_applies_at_once_and_an_invalid_config_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(live_config("http://upstream.test"), transport=httpx.MockTransport(
        lambda request: streamed(200, b"{}")))
    async with in_process(app) as client:
        client.headers["authorization"] = f"Bearer {CLIENT}"
        live = app.state.proxykit
        live.reload(live_config("http://upstream.test", models=("chat", "new")))
        assert await model_ids(client) == {"chat", "new"}
        with pytest.raises(ConfigError, match=r"models\[0\].deployments"):
            live.reload({"models": [{"name": "broken", "deployments": []}]})
        assert await model_ids(client) == {"chat", "new"}
        changed = live_config("http://upstream.test")
        changed["store"] = {"url": "sqlite://"}
        with caplog.at_level(logging.WARNING, logger="proxykit.live"):
            live.reload(changed)
        assert live.config.store.url == "none"  # read only at start
        assert "store.url changed: it takes effect at the next restart" in caplog.text


async def test_a_resting_key_stays_resting_across_an_unrelated_reload() -> None:
    answers = iter([streamed(429, b"{}", headers={"retry-after": "60"})])

    def upstream(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or streamed(200, b"{}")

    config = live_config("http://upstream.test", keys=("sk-a",))
    config["retry"] = {"attempts": 0}
    app = create_app(config, transport=httpx.MockTransport(upstream))
    async with in_process(app) as client:
        client.headers["authorization"] = f"Bearer {CLIENT}"
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 429
        app.state.proxykit.reload({**config, "models": [*config["models"], {
            "name": "other", "deployments": [{"base_url": "http://other.test/v1", "api_keys": ["sk-o"]}]}]})
        again = await client.post("/v1/chat/completions", json=CHAT)
        ready = (await client.get("/health/ready")).json()
    assert again.status_code == 503 and again.json()["error"]["code"] == "no_upstream_available"
    assert ready["models"]["chat"]["deployments"]["chat"]["resting"] == 1


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with serve(SlowStream(), lifespan="off") as url:
        yield url


async def stream_through(url: str, results: list[bytes]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30, headers={"authorization": f"Bearer {CLIENT}"}) as client:
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            assert response.status_code == 200
            results.append(b"".join([chunk async for chunk in response.aiter_raw()]))


async def test_fifty_streams_survive_five_rewrites_each_visible_at_once(upstream: str, tmp_path: Path) -> None:
    path = tmp_path / "proxykit.yaml"
    write_atomically(path, live_config(upstream))
    async with proxykit_process(tmp_path, "--config", str(path)) as proxy:
        finished: list[bytes] = []
        async with anyio.create_task_group() as streams, httpx.AsyncClient(
                base_url=proxy.url, headers={"authorization": f"Bearer {CLIENT}"}) as client:
            for _ in range(50):
                streams.start_soon(stream_through, proxy.url, finished)
            await anyio.sleep(0.5)  # every stream under way

            write_atomically(path, live_config(upstream, models=("chat", "added")))  # a model added
            await wait_for(client, lambda c: _has(c, "added"))
            write_atomically(path, live_config(upstream, models=("added",)))  # one removed
            await wait_for(client, lambda c: _lacks(c, "chat"))
            write_atomically(path, live_config(upstream, models=("added",), strategy="least-busy"))
            write_atomically(path, live_config(upstream, models=("added",), strategy="least-busy",
                                               keys=("sk-c",)))  # a key list changed
            await wait_for(client, lambda c: _key_alias_is(c, "added", {"added#0"}))
            write_atomically(path, live_config(upstream, models=("added",), rpm=2))  # the client's rpm
            await wait_for(client, lambda c: _limited_to(c, "2"))
            metrics = (await client.get("/metrics")).text
    assert len(finished) == 50 and all(body.endswith(b"data: [DONE]\n\n") for body in finished)
    assert all(body.count(b"piece-") == 40 for body in finished)  # not one event lost or cut
    assert 'proxykit_config_reloads_total{result="ok"}' in metrics


async def _has(client: httpx.AsyncClient, model: str) -> bool:
    return model in await model_ids(client)


async def _lacks(client: httpx.AsyncClient, model: str) -> bool:
    return model not in await model_ids(client)


async def _key_alias_is(client: httpx.AsyncClient, model: str, aliases: set[str]) -> bool:
    ready = (await client.get("/health/ready")).json()
    deployments = ready["models"].get(model, {}).get("deployments", {})
    entry = deployments.get(model)
    return entry is not None and bool(entry["available"] + entry["resting"] + entry["set_aside"] == len(aliases))


async def _limited_to(client: httpx.AsyncClient, rpm: str) -> bool:
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "added"})
    return bool(response.headers.get("x-ratelimit-limit-requests") == rpm)


async def test_a_configmap_symlink_swap_is_a_change(upstream: str, tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as `proxykit.yaml -> ..data/proxykit.yaml`, `..data -> ..v1`,
    and swaps `..data` to a new directory in one rename."""
    for version, models in (("..v1", ("chat",)), ("..v2", ("chat", "swapped"))):
        (tmp_path / version).mkdir()
        (tmp_path / version / "proxykit.yaml").write_text(json.dumps(live_config(upstream, models=models)))
    (tmp_path / "..data").symlink_to("..v1")
    path = tmp_path / "proxykit.yaml"
    path.symlink_to("..data/proxykit.yaml")
    async with proxykit_process(tmp_path, "--config", str(path)) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, headers={"authorization": f"Bearer {CLIENT}"}) as client:
            assert await model_ids(client) == {"chat"}
            (tmp_path / "..data_tmp").symlink_to("..v2")
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
            await wait_for(client, lambda c: _has(c, "swapped"))


async def test_an_invalid_file_keeps_the_running_config_and_says_why_once(upstream: str, tmp_path: Path) -> None:
    path = tmp_path / "proxykit.yaml"
    write_atomically(path, live_config(upstream))
    async with proxykit_process(tmp_path, "--config", str(path)) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, headers={"authorization": f"Bearer {CLIENT}"}) as client:
            broken = live_config(upstream, models=("chat", "fine"))
            broken["models"][1]["deployments"][0]["base_url"] = "not a url"
            broken["routing"]["strategy"] = "fastest"
            write_atomically(path, broken)
            await anyio.sleep(2.5)  # two looks at the file: it is reported once, not every second
            assert await model_ids(client) == {"chat"}
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            metrics = (await client.get("/metrics")).text
        output = proxy.output
    assert 'proxykit_config_reloads_total{result="error"} 1.0' in metrics
    assert output.count("models[1].deployments[0].base_url") == 1 and output.count("routing.strategy") == 1
    assert "ERROR" in output


async def test_sighup_rereads_the_file_in_every_worker(upstream: str, tmp_path: Path) -> None:
    path = tmp_path / "proxykit.yaml"
    write_atomically(path, live_config(upstream))
    async with proxykit_process(tmp_path, "--config", str(path), "--workers", "2") as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            await anyio.sleep(1)  # both workers up (the first answered /health)
            proxy.process.send_signal(signal.SIGHUP)  # the file is unchanged: only the signal re-reads it
            with anyio.fail_after(10):
                while 'proxykit_config_reloads_total{result="ok"} 2.0' not in (await client.get("/metrics")).text:
                    await anyio.sleep(0.2)  # any worker answers: the metric adds up both
            write_atomically(path, live_config(upstream, models=("chat", "hup")))
            proxy.process.send_signal(signal.SIGHUP)
            with anyio.fail_after(10):
                while True:  # a new connection each time: the kernel spreads them over both workers
                    seen = []
                    for _ in range(10):
                        async with httpx.AsyncClient(base_url=proxy.url,
                                                     headers={"authorization": f"Bearer {CLIENT}"}) as fresh:
                            seen.append("hup" in await model_ids(fresh))
                    if all(seen):
                        break
                    await anyio.sleep(0.2)
        assert proxy.process.poll() is None
    assert "restarting processes" not in proxy.output  # uvicorn's own SIGHUP would replace the workers
