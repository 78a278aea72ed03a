"""How late the event loop is: the longest a 10 ms timer waited past its time since the last
scrape, exported as `proxykit_event_loop_lag_seconds`. A periodic burst of work that holds the
loop (a fold of metrics, a garbage collection) shows as a number here, long before it shows as a
p99.

    probe = LoopLagProbe()
    probe.start(asyncio.get_running_loop())
    registry.register(probe)
    probe.enter(); ...; probe.leave()   # around each request (the metrics layer does it)

A stall harms only the requests in flight, so the probe ticks while there are some and rests
once there have been none for a second: an idle proxy is not woken a hundred times a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

INTERVAL: Final = 0.01  # seconds between two ticks: a hundred cheap callbacks a second
REST_AFTER: Final = 1.0  # seconds with no request in flight before the ticks stop


class LoopLagProbe(Collector):
    def __init__(self, *, rest_after: float = REST_AFTER) -> None:
        self.worst = 0.0  # seconds, since the last scrape
        self.in_flight = 0  # requests between `enter` and `leave`
        self._quiet_ticks_to_rest = max(1, round(rest_after / INTERVAL))
        self._quiet_ticks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop time the next tick is due

    @property
    def ticking(self) -> bool:
        return self._timer is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop()
        self._loop = loop
        self._arm(loop.time())

    def stop(self) -> None:
        self._loop = None  # no `enter` wakes a stopped probe
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def enter(self) -> None:
        """A request has begun: tick again if resting, or if the loop ticking ended (a host may run
        the app on one event loop after another), on the loop that runs this request."""
        self.in_flight += 1
        if self._loop is not None and (self._timer is None or self._loop.is_closed()):
            self._loop = asyncio.get_running_loop()
            self._arm(self._loop.time())

    def leave(self) -> None:
        self.in_flight -= 1

    def _arm(self, now: float) -> None:
        self._quiet_ticks = 0
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + INTERVAL
        self._timer = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.worst = max(self.worst, now - self._due)
        self._quiet_ticks = self._quiet_ticks + 1 if self.in_flight <= 0 else 0
        if self._quiet_ticks >= self._quiet_ticks_to_rest:
            self._timer = None  # resting until the next `enter`
            return
        self._schedule(now)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        worst, self.worst = self.worst, 0.0
        yield GaugeMetricFamily("proxykit_event_loop_lag_seconds",
                                "The longest a timer ran late on the event loop since the last scrape.", value=worst)
