"""Prometheus metrics: exact counts after known traffic, bounded labels, no secrets, no clashes."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import prometheus_client
import pytest
import respx
import yaml
from prometheus_client.parser import text_string_to_metric_families

import proxykit.metrics
from proxykit import DemoUpstream, create_app
from proxykit.config.reader import config_from_dict
from proxykit.demo import demo_config
from proxykit.keys.pool import KeyPool
from proxykit.metrics import ProxyMetrics
from tests.conftest import (
    CHAT,
    CLIENT_KEY,
    UPSTREAM_KEYS,
    in_process,
    make_config,
    proxy_in_front_of,
    proxykit_process,
    respx_proxy,
    serve,
    streamed,
    with_auth,
)
from tests.upstreams import GatedStream

pytestmark = pytest.mark.anyio

PLAIN = json.dumps({
    "choices": [{"message": {"content": "hi"}}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 20, "completion_tokens_details": {"reasoning_tokens": 5}},
}).encode()
STREAM_EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\ndata: [DONE]\n\n',
]
SSE = {"content-type": "text/event-stream"}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """`{sorted label pairs: value}` of one metric's samples (counters: the `_total` sample)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for key, v in samples(text, name).items() if all((k, labels[k]) in key for k in labels))


def priced_config() -> dict[str, Any]:
    config = with_auth(make_config())
    config["models"][0]["pricing"] = {"input_per_1m": 1.0, "output_per_1m": 2.0}
    config["retry"] = {"backoff": {"initial": 0, "max": 0}}
    return config


async def test_counts_tokens_and_cost_after_known_traffic() -> None:
    key = {"authorization": f"Bearer {CLIENT_KEY}"}
    async with respx_proxy(priced_config()) as (router, client):
        route = router.post("/chat/completions")
        route.side_effect = lambda request: (
            streamed(200, *STREAM_EVENTS, headers=SSE) if json.loads(request.content).get("stream")
            else streamed(200, PLAIN, headers={"content-type": "application/json"})
        )
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code == 200
        streaming = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=key)
        unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=key)
        assert (streaming.status_code, unknown.status_code) == (200, 404)
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 401
        text = (await client.get("/metrics")).text
    assert value(text, "proxykit_requests_total", model="chat", client="team-a", status="200") == 4
    assert value(text, "proxykit_requests_total", model="unknown", client="team-a", status="404") == 1
    assert value(text, "proxykit_requests_total", model="unknown", client="anonymous", status="401") == 1
    assert value(text, "proxykit_tokens_total", model="chat", type="prompt") == 3 * 10 + 7
    assert value(text, "proxykit_tokens_total", model="chat", type="completion") == 3 * 20 + 2
    assert value(text, "proxykit_tokens_total", model="chat", type="reasoning") == 3 * 5
    assert value(text, "proxykit_cost_usd_total", model="chat", client="team-a") == pytest.approx(
        (37 * 1.0 + 62 * 2.0) / 1e6)
    assert value(text, "proxykit_upstream_attempts_total", deployment="chat", outcome="ok") == 4
    assert value(text, "proxykit_request_duration_seconds_count", model="chat") == 4
    assert value(text, "proxykit_overhead_seconds_count", model="chat") == 4
    assert value(text, "proxykit_time_to_first_byte_seconds_count", model="chat") == 4
    assert value(text, "proxykit_in_flight_requests") == 1  # the scrape itself
    assert samples(text, "proxykit_upstream_key_available") == {
        (("deployment", "chat"), ("key", "chat#0")): 1.0, (("deployment", "chat"), ("key", "chat#1")): 1.0}


async def test_retries_and_attempts_are_counted_by_reason_and_key() -> None:
    async with respx_proxy(priced_config()) as (router, client):
        replies = iter([streamed(429, b"{}", headers={"retry-after": "9"}), streamed(200, PLAIN)])
        router.post("/chat/completions").mock(side_effect=lambda request: next(replies))
        await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CLIENT_KEY})
        text = (await client.get("/metrics")).text
    assert value(text, "proxykit_upstream_attempts_total", key="chat#0", outcome="http_429") == 1
    assert value(text, "proxykit_upstream_attempts_total", key="chat#1", outcome="ok") == 1
    assert value(text, "proxykit_retries_total", model="chat", reason="http_429") == 1
    assert samples(text, "proxykit_upstream_key_available")[(("deployment", "chat"), ("key", "chat#0"))] == 0.0


async def test_injected_usage_event_is_counted_but_never_reaches_a_client_that_did_not_ask() -> None:
    async with respx_proxy(make_config()) as (router, client):
        route = router.post("/chat/completions").mock(
            side_effect=lambda request: streamed(200, *STREAM_EVENTS, headers=SSE)
        )
        plain = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        asked = await client.post("/v1/chat/completions", json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
        text = (await client.get("/metrics")).text
    first, second = (json.loads(call.request.content) for call in route.calls)
    assert first["stream_options"] == {"include_usage": True}  # proxykit asked for it
    assert plain.content == STREAM_EVENTS[0] + STREAM_EVENTS[1] + b"data: [DONE]\n\n"
    assert asked.content == b"".join(STREAM_EVENTS)  # the client asked: it gets exactly what came
    assert second["stream_options"] == {"include_usage": True}
    assert value(text, "proxykit_tokens_total", type="completion") == 4


async def test_a_stream_proxykit_asks_usage_for_comes_uncompressed_so_the_usage_can_be_taken_out() -> None:
    # SDKs send `accept-encoding: gzip` (httpx does); a compressed stream could not be cut.
    gzip_ok = {"accept-encoding": "gzip, deflate"}
    async with respx_proxy(make_config()) as (router, client):
        route = router.post("/chat/completions").mock(
            side_effect=lambda request: streamed(200, *STREAM_EVENTS, headers=SSE))
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=gzip_ok)
        await client.post("/v1/chat/completions", headers=gzip_ok, json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
    injected, asked = (call.request.headers.get_list("accept-encoding") for call in route.calls)
    assert injected == ["identity"]
    assert asked == ["gzip, deflate"]  # the client asked for usage itself: its choice stands


async def test_responses_api_requests_go_up_unchanged_and_their_usage_is_counted() -> None:
    # The Responses API rejects `stream_options.include_usage`, names its tokens input and output,
    # and streams usage inside the response of its last event.
    config = make_config()
    config["models"][0]["deployments"][0]["model"] = "chat"  # no model change: the body could stay
    usage = {"input_tokens": 11, "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 2},
             "total_tokens": 17}
    completed = {"type": "response.completed", "response": {"id": "resp_1", "status": "completed", "usage": usage}}
    events = [
        b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1","usage":null}}\n\n',
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n',
        b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n",
    ]
    plain: dict[str, Any] = {
        "id": "resp_2", "output": [], "usage": {"input_tokens": 5, "output_tokens": 3}, "user": None}
    stream_body = b'{"model": "chat", "input": "hi", "stream": true}'
    async with respx_proxy(config) as (router, client):
        route = router.post("/responses").mock(side_effect=[
            streamed(200, *events, headers=SSE), streamed(200, json.dumps(plain).encode())])
        stream = await client.post("/v1/responses", content=stream_body, headers={"content-type": "application/json"})
        answer = await client.post("/v1/responses", json={"model": "chat", "input": "hi"})
        text = (await client.get("/metrics")).text
    assert route.calls[0].request.content == stream_body  # no usage option added
    assert stream.content == b"".join(events)
    assert answer.json() == plain
    assert value(text, "proxykit_tokens_total", type="prompt") == 11 + 5
    assert value(text, "proxykit_tokens_total", type="completion") == 6 + 3
    assert value(text, "proxykit_tokens_total", type="reasoning") == 2


@pytest.mark.parametrize("raw", [
    # Non-ASCII text stays as the client wrote it (re-encoding would escape it), spacing too.
    '{"model": "chat",  "stream": true, "messages": [{"role": "user", "content": "héllo ✓"}]} \n'.encode(),
    # Options the client set survive, merged with the usage request; no key appears twice.
    b'{"model": "chat", "stream": true, "stream_options": {"include_usage": false, "x": 1}, "messages": []}',
    b'{"model": "chat", "stream": true, "stream_options": null, "messages": []}',
    # JSON may come in UTF-16: it cannot be appended to, and is encoded again.
    '{"model": "chat", "stream": true, "messages": []}'.encode("utf-16"),
    '{"model": "chat", "stream": true, "messages": []}'.encode("utf-16-be"),  # ends in b"}" all the same
], ids=["non-ascii", "options-merged", "options-null", "utf-16", "utf-16-be"])
async def test_usage_is_asked_for_in_a_body_that_stays_valid_json(raw: bytes) -> None:
    config = make_config()
    config["models"][0]["deployments"][0]["model"] = "chat"  # no model change: only the usage request
    async with respx_proxy(config) as (router, client):
        route = router.post("/chat/completions").mock(
            side_effect=lambda request: streamed(200, *STREAM_EVENTS, headers=SSE))
        response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    sent = route.calls.last.request.content
    pairs: list[list[tuple[str, object]]] = []

    def remember(items: list[tuple[str, object]]) -> dict[str, object]:
        pairs.append(items)
        return dict(items)

    payload = json.loads(sent, object_pairs_hook=remember)
    expected = json.loads(raw)
    expected["stream_options"] = {**(expected.get("stream_options") or {}), "include_usage": True}
    assert payload == expected
    assert all(len({name for name, _ in items}) == len(items) for items in pairs)  # no duplicate keys
    if raw.startswith(b'{"model": "chat",  "stream"'):
        assert sent.startswith(raw.rstrip()[:-1])  # the client's bytes, the member appended
    assert b"usage" not in response.content  # the injected event went to the metrics, not the client


async def test_openai_null_usage_events_pass_untouched_and_the_real_one_is_counted_and_removed() -> None:
    # Asked for usage, OpenAI sends `"usage": null` in every event before the one that carries it.
    events = [event.replace(b"}}]}", b'}}],"usage":null}') for event in STREAM_EVENTS[:2]]
    async with respx_proxy(make_config()) as (router, client):
        router.post("/chat/completions").mock(
            side_effect=lambda request: streamed(200, *events, STREAM_EVENTS[2], headers=SSE))
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        text = (await client.get("/metrics")).text
    assert b'"usage":null' in events[0]
    assert response.content == events[0] + events[1] + b"data: [DONE]\n\n"
    assert value(text, "proxykit_tokens_total", type="completion") == 2


async def test_gzip_upstream_usage_is_counted_and_the_bytes_stay_compressed() -> None:
    compressed = gzip.compress(PLAIN)
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    async with respx_proxy(make_config()) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(
            200, compressed[:10], compressed[10:], headers=headers))
        response = await client.post("/v1/chat/completions", json=CHAT, headers={"accept-encoding": "gzip"})
        text = (await client.get("/metrics")).text
    assert response.json() == json.loads(PLAIN)  # httpx decoded what came through compressed
    assert response.headers["content-encoding"] == "gzip"
    assert value(text, "proxykit_tokens_total", type="prompt") == 10


async def test_abandoned_stream_counts_as_499_with_what_was_sent() -> None:
    upstream = GatedStream(events=3)
    async with proxy_in_front_of(upstream) as url, httpx.AsyncClient() as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            upstream.release(0)
            upstream.release(1)
            received = b""
            with anyio.fail_after(5):
                async for chunk in response.aiter_raw():
                    received += chunk
                    if received.count(b"\n\n") == 2:
                        break
        with anyio.fail_after(5):
            while True:
                text = (await client.get(f"{url}/metrics")).text
                if value(text, "proxykit_requests_total", status="499"):
                    break
                await anyio.sleep(0.05)
        upstream.release(2)  # let the upstream app finish, so its server can stop
        upstream.release(3)
    assert value(text, "proxykit_requests_total", model="chat", status="499") == 1
    assert value(text, "proxykit_tokens_total", model="chat", type="completion") == 2


async def test_no_label_or_value_carries_any_part_of_a_key() -> None:
    async with respx_proxy(priced_config()) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, PLAIN))
        await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CLIENT_KEY})
        await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "pk-guessed-secret-zzzz"})
        text = (await client.get("/metrics")).text
    for secret in (*UPSTREAM_KEYS, CLIENT_KEY, "pk-guessed-secret-zzzz"):
        for start in range(0, len(secret) - 10):  # any 10 characters of a key
            assert secret[start:start + 10] not in text


async def test_label_cardinality_stays_fixed_whatever_models_clients_name() -> None:
    async with respx_proxy(make_config()) as (_, client):
        await client.post("/v1/chat/completions", json={**CHAT, "model": "warm-up"})
        await client.get("/metrics")  # a scrape is a request too: its own series exists from now on
        before = len((await client.get("/metrics")).text.splitlines())
        for i in range(1000):
            await client.post(f"/v1/chat/completions/{i}", json={**CHAT, "model": f"made-up-{i}"})
        after = (await client.get("/metrics")).text
    assert "made-up" not in after
    assert len(after.splitlines()) == before


async def test_two_apps_in_one_process_do_not_clash() -> None:
    first, second = create_app(make_config()), create_app(make_config())
    async with in_process(first) as one, in_process(second) as two:
        assert (await one.get("/metrics")).status_code == 200
        assert (await two.get("/metrics")).status_code == 200
    names = {metric.name for metric in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("proxykit") for name in names)  # nothing on the global registry


async def test_metrics_can_be_turned_off() -> None:
    async with in_process(create_app(make_config(metrics={"enabled": False}))) as client:
        response = await client.get("/metrics")
    assert response.status_code == 404


async def test_workers_report_totals_across_processes(tmp_path: Path) -> None:
    async with serve(DemoUpstream(delay=0), lifespan="off") as upstream_url:
        path = tmp_path / "proxykit.yaml"
        path.write_text(yaml.safe_dump(demo_config(f"{upstream_url}/v1")))
        async with proxykit_process(tmp_path, "--config", str(path), "--workers", "2") as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                for _ in range(20):
                    response = await client.post("/v1/chat/completions", json={
                        "model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]})
                    assert response.status_code == 200
                scraped = [value((await client.get("/metrics")).text, "proxykit_requests_total", model="demo-chat")
                           for _ in range(4)]
    assert scraped == [20.0] * 4  # whichever worker answers the scrape


async def test_changes_reach_a_host_reading_the_registry_and_are_folded_in_without_a_scrape() -> None:
    router = respx.MockRouter(base_url="http://upstream.test/v1", using=None)
    router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, PLAIN))
    app = create_app(make_config(), transport=httpx.MockTransport(router.async_handler))
    resources = app.state.resources
    async with in_process(app) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        # A host app that serves the registry itself, not through proxykit's /metrics.
        text = prometheus_client.generate_latest(resources.registry).decode()
        assert value(text, "proxykit_requests_total", model="chat", status="200") == 1
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        requests = resources.metrics.requests  # its own collect() does not flush: only the timer can
        with anyio.fail_after(5):  # a liveness bound: folded in within about a second
            while value(_exposed(requests), "proxykit_requests_total", model="chat", status="200") != 2:
                await anyio.sleep(0.05)


def _exposed(metric: prometheus_client.metrics.MetricWrapperBase) -> str:
    registry = prometheus_client.CollectorRegistry()
    registry.register(metric)
    return prometheus_client.generate_latest(registry).decode()


def test_changes_are_folded_in_when_the_app_moves_to_another_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxykit.metrics, "FLUSH_EVERY", 0.05)
    metrics = ProxyMetrics(prometheus_client.CollectorRegistry(), KeyPool(config_from_dict(make_config())))
    labels = ("chat", "anonymous", "200")

    async def count_one(wait: float) -> None:
        metrics.add(metrics.requests, labels)
        await asyncio.sleep(wait)

    asyncio.run(count_one(0))  # this loop ends before its flush timer fires
    time.sleep(1.2)  # long enough for that timer to count as lost
    asyncio.run(count_one(0.5))  # a timer on this loop folds both in
    assert value(_exposed(metrics.requests), "proxykit_requests_total") == 2


async def test_an_upstream_usage_of_400_digits_is_not_counted_and_leaves_nothing_in_flight() -> None:
    digits = b"9" * 400
    body = b'{"choices": [], "usage": {"prompt_tokens": ' + digits + b', "completion_tokens": 3}}'
    async with respx_proxy(priced_config()) as (router, client):
        router.post("/chat/completions").mock(side_effect=lambda request: streamed(200, body))
        auth = {"authorization": f"Bearer {CLIENT_KEY}"}
        response = await client.post("/v1/chat/completions", json=CHAT, headers=auth)
        text = (await client.get("/metrics")).text
    assert response.status_code == 200
    assert value(text, "proxykit_requests_total", model="chat", status="200") == 1
    assert value(text, "proxykit_tokens_total", type="prompt") == 0  # not a count any upstream could mean
    assert value(text, "proxykit_tokens_total", type="completion") == 3
    assert value(text, "proxykit_in_flight_requests", model="chat") == 0


async def test_a_seconds_worth_of_observations_is_folded_a_slice_a_loop_turn() -> None:
    pool = KeyPool(config_from_dict(make_config()))
    metrics = ProxyMetrics(prometheus_client.CollectorRegistry(), pool)
    observations = [(metrics.duration, ("chat",), 0.01)] * (3 * proxykit.metrics.FOLD_SLICE + 7)
    metrics.record((), observations)
    metrics.flush_spread()  # what the one-second timer runs

    def folded() -> float:  # read from the histogram itself: a registry's collection would fold it all
        [family] = metrics.duration.collect()
        return next(s.value for s in family.samples if s.name.endswith("_count") and s.labels["model"] == "chat")

    assert round(folded()) == proxykit.metrics.FOLD_SLICE  # one slice now, not all of them
    for _ in range(10):
        await asyncio.sleep(0)  # the loop turns: the rest follows, a slice at a time
    assert round(folded()) == len(observations)
    metrics.close()


async def test_a_scrape_folds_what_is_pending_a_slice_a_loop_turn_and_shows_all_of_it() -> None:
    # Under load a second's observations at once held the loop for ~20 ms at every scrape.
    metrics = ProxyMetrics(prometheus_client.CollectorRegistry(), KeyPool(config_from_dict(make_config())))
    labels = ("chat", "anonymous", "200")
    observations = [(metrics.duration, ("chat",), 0.01)] * (3 * proxykit.metrics.FOLD_SLICE + 7)
    metrics.record([(metrics.requests, labels, 1.0)], observations)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    before = turns
    text = (await metrics.scrape()).decode()
    during = turns - before
    metrics.record([(metrics.requests, labels, 1.0)], [(metrics.duration, ("chat",), 0.01)] * 5)
    after = (await metrics.scrape()).decode()
    counter.cancel()
    assert during >= 3  # the loop turned between the slices
    assert value(text, "proxykit_request_duration_seconds_count", model="chat") == len(observations)
    assert value(text, "proxykit_requests_total", model="chat", status="200") == 1
    assert value(after, "proxykit_request_duration_seconds_count", model="chat") == len(observations) + 5
    assert value(after, "proxykit_requests_total", model="chat", status="200") == 2
    metrics.close()


async def test_the_event_loop_lag_is_exported_and_read_once() -> None:
    async with respx_proxy(make_config()) as (_, client):
        await asyncio.sleep(0.05)
        first = (await client.get("/metrics")).text
    assert value(first, "proxykit_event_loop_lag_seconds") >= 0
    assert "# TYPE proxykit_event_loop_lag_seconds gauge" in first
