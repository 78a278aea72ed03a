"""Watching each upstream attempt: the client leaving cancels it, and so does a late first byte.

    watches = AttemptWatches(loop)
    watch = watches.watch(receive, ctx, forwarding_task, first_byte=120.0)
    ... await the upstream's headers ...
    watch.first_byte_arrived()
    ... relay ...
    watch.stop()

One timer for every attempt in flight, ticking every `TICK` seconds while there are any, rather
than timers of each attempt's own: setting and cancelling a timer per request is a measurable
share of the proxy's work. A disconnect watch starts `WATCH_AFTER` seconds into an attempt: a
fast answer, even under load, is relayed before that, and needs no watching task at all. So a
client who leaves is noticed within `WATCH_AFTER + TICK` seconds, and a first-byte deadline
passes up to `TICK` late. Plain asyncio rather than an anyio task group and cancel scope, which
cost more per request than the rest of the forwarder (the upstream client runs on asyncio
anyway). The benchmark's README has the figures.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from starlette.types import Receive

from proxykit.body import until_disconnect
from proxykit.context import RequestContext

WATCH_AFTER: Final = 0.1  # seconds: short next to any LLM generation
TICK: Final = 0.05


class AttemptWatches:
    """The attempts in flight on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._watched: dict[AttemptWatch, None] = {}  # a dict: ordered, O(1) removal
        self._timer: asyncio.TimerHandle | None = None

    def watch(
        self, receive: Receive, ctx: RequestContext, forwarding: asyncio.Task[Any], first_byte: float
    ) -> AttemptWatch:
        watch = AttemptWatch(self, receive, ctx, forwarding, self.loop.time(), first_byte)
        self._watched[watch] = None
        if self._timer is None:
            self._timer = self.loop.call_later(TICK, self._tick)
        return watch

    def forget(self, watch: AttemptWatch) -> None:
        self._watched.pop(watch, None)

    def _tick(self) -> None:
        now = self.loop.time()
        for watch in list(self._watched):
            watch.check(now)
        self._timer = self.loop.call_later(TICK, self._tick) if self._watched else None


class AttemptWatch:
    """Cancels its forwarding task when the client leaves (the upstream call ends with it), or
    when the upstream's headers are later than the first-byte deadline (`first_byte_late`)."""

    __slots__ = ("_ctx", "_deadline", "_forwarding", "_receive", "_task", "_waiting", "_watch_from", "_watches",
                 "first_byte_late")

    def __init__(
        self, watches: AttemptWatches, receive: Receive, ctx: RequestContext, forwarding: asyncio.Task[Any],
        started: float, first_byte: float,
    ) -> None:
        self._watches, self._receive, self._ctx, self._forwarding = watches, receive, ctx, forwarding
        self._watch_from, self._deadline = started + WATCH_AFTER, started + first_byte
        self._task: asyncio.Task[None] | None = None
        self._waiting = True  # for the upstream's headers
        self.first_byte_late = False

    def check(self, now: float) -> None:
        if self._task is None and now >= self._watch_from:
            self._task = self._watches.loop.create_task(self._watch_disconnect())
        if self._waiting and now >= self._deadline:
            self._waiting, self.first_byte_late = False, True
            self._forwarding.cancel()

    def first_byte_arrived(self) -> None:
        self._waiting = False

    def stop(self) -> None:
        self._watches.forget(self)
        if self._task is not None:
            self._task.cancel()

    async def _watch_disconnect(self) -> None:
        await until_disconnect(self._receive)
        # After a complete response, servers report a disconnect too; that one is no news.
        if not self._ctx.finished:
            self._ctx.disconnected = True
            self._forwarding.cancel()
