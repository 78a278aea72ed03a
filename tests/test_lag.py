"""The event-loop lag probe: it measures stalls while requests are in flight, and lets an idle
proxy sleep."""

from __future__ import annotations

import asyncio
import time

import anyio
import httpx
import pytest

from proxykit import create_app
from proxykit.lag import INTERVAL, LoopLagProbe
from tests.conftest import CHAT, make_config, serve
from tests.upstreams import GatedStream

pytestmark = pytest.mark.anyio

REST_AFTER = 0.05  # seconds: short, so the tests need not wait out the real second


async def _stall(seconds: float) -> None:
    """Holds the loop, then lets the probe's next tick run."""
    time.sleep(seconds)  # the point: nothing else runs meanwhile
    await asyncio.sleep(2 * INTERVAL)


async def test_an_idle_probe_stops_ticking_and_a_stall_then_is_not_counted() -> None:
    probe = LoopLagProbe(rest_after=REST_AFTER)
    probe.start(asyncio.get_running_loop())
    assert probe.ticking
    await asyncio.sleep(REST_AFTER + 10 * INTERVAL)
    assert not probe.ticking
    probe.worst = 0.0
    await _stall(0.05)
    assert probe.worst == 0.0  # no request waited on it
    probe.stop()


async def test_a_request_wakes_a_resting_probe_and_its_stalls_are_measured() -> None:
    probe = LoopLagProbe(rest_after=REST_AFTER)
    probe.start(asyncio.get_running_loop())
    await asyncio.sleep(REST_AFTER + 10 * INTERVAL)
    assert not probe.ticking
    probe.enter()
    assert probe.ticking
    await _stall(0.05)
    assert probe.worst >= 0.04
    probe.leave()
    probe.stop()


async def test_a_long_request_keeps_the_probe_ticking_until_it_ends() -> None:
    probe = LoopLagProbe(rest_after=REST_AFTER)
    probe.start(asyncio.get_running_loop())
    probe.enter()
    await asyncio.sleep(4 * REST_AFTER)
    assert probe.ticking  # a stream of minutes is measured all along
    await _stall(0.05)
    assert probe.worst >= 0.04
    probe.leave()
    await asyncio.sleep(REST_AFTER + 10 * INTERVAL)
    assert not probe.ticking
    probe.stop()


async def test_a_stopped_probe_stays_stopped_when_a_request_comes() -> None:
    probe = LoopLagProbe(rest_after=REST_AFTER)
    probe.start(asyncio.get_running_loop())
    probe.stop()  # metrics turned off by a reload
    probe.enter()
    assert not probe.ticking
    probe.leave()


async def test_the_metrics_layer_counts_a_stream_in_flight_for_the_probe_until_it_ends() -> None:
    upstream = GatedStream(events=1)
    async with serve(upstream, lifespan="off") as upstream_url:
        app = create_app(make_config(f"{upstream_url}/v1"))
        probe = app.state.resources.metrics.loop_lag
        async with serve(app) as url, httpx.AsyncClient() as client:
            assert probe.in_flight == 0
            async with client.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
                upstream.release(0)
                chunks = response.aiter_raw()
                await anext(chunks)
                assert probe.in_flight == 1
                assert probe.ticking
                upstream.release(1)
                async for _ in chunks:
                    pass
            with anyio.fail_after(5):
                while probe.in_flight:
                    await anyio.sleep(0.01)
            # An answer the gates no longer hold: counted in and out as well.
            assert (await client.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True})).status_code == 200
            assert probe.in_flight == 0


def test_a_probe_resting_when_its_loop_ended_wakes_on_the_loop_of_the_next_request() -> None:
    probe = LoopLagProbe(rest_after=REST_AFTER)

    async def start_and_rest() -> None:
        probe.start(asyncio.get_running_loop())
        await asyncio.sleep(REST_AFTER + 10 * INTERVAL)

    async def request_with_a_stall() -> None:
        probe.enter()
        await _stall(0.05)
        probe.leave()

    asyncio.run(start_and_rest())  # that loop is closed now
    assert not probe.ticking
    asyncio.run(request_with_a_stall())
    assert probe.worst >= 0.04


def test_a_probe_ticking_when_its_loop_ended_ticks_on_the_loop_of_the_next_request() -> None:
    probe = LoopLagProbe(rest_after=REST_AFTER)

    async def start_and_leave_at_once() -> None:
        probe.start(asyncio.get_running_loop())

    async def request_with_a_stall() -> None:
        probe.enter()
        await _stall(0.05)
        probe.leave()

    asyncio.run(start_and_leave_at_once())  # its first tick never came
    assert probe.ticking
    asyncio.run(request_with_a_stall())
    assert probe.worst >= 0.04


async def test_a_stall_of_over_a_second_is_measured_whatever_runs_first_after_it() -> None:
    probe = LoopLagProbe(rest_after=REST_AFTER)
    probe.start(asyncio.get_running_loop())
    probe.enter()
    time.sleep(1.2)
    probe.enter()  # a request the stall held back may begin before the late tick runs
    await asyncio.sleep(2 * INTERVAL)
    assert probe.worst >= 1.1
    probe.leave()
    probe.leave()
    probe.stop()
