"""How late the event loop is: the longest a 10 ms timer waited past its time since the last
scrape, exported as `proxykit_event_loop_lag_seconds`. A periodic burst of work that holds the
loop (a fold of metrics, a garbage collection) shows as a number here, long before it shows as a
p99.

    probe = LoopLagProbe()
    probe.start(asyncio.get_running_loop())
    registry.register(probe)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

INTERVAL: Final = 0.01  # seconds between two ticks: a hundred cheap callbacks a second


class LoopLagProbe(Collector):
    def __init__(self) -> None:
        self.worst = 0.0  # seconds, since the last scrape
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop()
        self._loop = loop
        self._due = loop.time() + INTERVAL
        self._timer = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.worst = max(self.worst, now - self._due)
        self._due = now + INTERVAL
        self._timer = self._loop.call_at(self._due, self._tick)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        worst, self.worst = self.worst, 0.0
        yield GaugeMetricFamily("proxykit_event_loop_lag_seconds",
                                "The longest a timer ran late on the event loop since the last scrape.", value=worst)
