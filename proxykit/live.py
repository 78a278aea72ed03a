"""Live configuration: the layers every request passes are one swappable snapshot, built from
the running config; a new config builds new layers and swaps them in at once. A request in
flight keeps the layers it started with; what must outlive a swap (key state, limit buckets,
the cache, the store, the connection pool) lives in `Resources`, which takes the new config in
place.

    live = app.state.proxykit
    live.reload(new_config)        # a Config, a dict, or a path; raises ConfigError and changes nothing
    live.request_reload()          # SIGHUP: re-read the config file (and key files) soon
    await live.set_overrides(o)    # the management API's changes, on top of the file

`proxykit serve --config FILE` (and `create_app(path)` with its lifespan run) re-reads the file
when it changes, checked every second. Overrides persist in the store, and every replica sharing
it reads them every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit.config import Config, ConfigError
from proxykit.config.live import ConfigFile, keep_restart_only
from proxykit.config.overrides import Overrides, apply_overrides, key_hash
from proxykit.config.reader import config_from_dict, load_config
from proxykit.resources import Resources
from proxykit.store.sql import StoreUnavailable

logger = logging.getLogger(__name__)

WATCH_EVERY: Final = 1.0  # seconds between looks at the config file and at the store's overrides

# Builds the layers for the running config around the app's routes: (outer layers, forwarding layers).
Build = Callable[[Resources, ASGIApp], tuple[ASGIApp, ASGIApp]]


class Live:
    """The running config of one app and the layers built from it: `app.state.proxykit`."""

    def __init__(self, resources: Resources, build: Build, *, source: ConfigFile | None = None) -> None:
        self.resources = resources
        self.source = source
        self._build = build
        self._inner: ASGIApp | None = None
        self.layers: ASGIApp | None = None  # what every request enters
        self.forwarding: ASGIApp | None = None  # the forwarding layers, for the management API's /generate
        self._reload_requested = False
        self._tasks: list[asyncio.Task[None]] = []
        self.file_config = resources.config  # what the file says; the running config adds the overrides
        self.overrides = Overrides()
        self._stored_overrides: list[tuple[str, str, str]] = []

    @property
    def config(self) -> Config:
        return self.resources.config

    def attach(self, inner: ASGIApp) -> None:
        """The app's routes, inside the layers; called once, when the app first builds its stack."""
        self._inner = inner
        self.layers, self.forwarding = self._build(self.resources, inner)

    def reload(self, config: Config | dict[str, Any] | str | os.PathLike[str]) -> None:
        """Swaps in a new config for new requests. An invalid one raises ConfigError and changes
        nothing; fields read only at start keep their running values (a WARNING each)."""
        if isinstance(config, dict):
            config = config_from_dict(config)
        elif not isinstance(config, Config):
            config = load_config(Path(config))
        config, warnings = keep_restart_only(self.file_config, config)
        for warning in warnings:
            logger.warning("%s", warning)
        self.file_config = config
        added, retired = self._apply()
        logger.info("config reloaded: %d models, %d upstream keys added, %d retired",
                    len(config.models), added, retired)

    async def set_overrides(self, overrides: Overrides) -> bool:
        """Applies the management API's overrides at once, and keeps them in the store for the
        other replicas and the next start. False: there is no store (this process only)."""
        apply_overrides(self.file_config, overrides)  # raises before anything changes
        ledger = self.resources.ledger
        if ledger is not None:
            rows, now = overrides.rows(), time.time()
            await ledger.query(lambda store: store.replace_overrides(rows, now))
            self._stored_overrides = sorted(rows)
        self.overrides = overrides
        self._apply()
        return ledger is not None

    def _apply(self) -> tuple[int, int]:
        config, warnings = apply_overrides(self.file_config, self.overrides)
        for warning in warnings:
            logger.warning("%s", warning)
        changed = self.resources.apply(config)
        pool = self.resources.keys
        switched = self.overrides.keys
        for state in pool.all_keys():
            enabled = switched.get(key_hash(state.deployment.name, state.secret)) if switched else None
            pool.disable(state, enabled is False)
        if self._inner is not None:
            self.layers, self.forwarding = self._build(self.resources, self._inner)
        return changed

    async def sync_overrides(self) -> None:
        """Takes the store's overrides when another replica (or a restart) changed them."""
        ledger = self.resources.ledger
        if ledger is None:
            return
        try:
            rows = sorted(await ledger.query(lambda store: store.overrides(), timeout=WATCH_EVERY * 5))
        except StoreUnavailable:
            return  # the store's own health is reported elsewhere; the overrides in force stay
        if rows != self._stored_overrides:
            self._stored_overrides = rows
            self.overrides = Overrides.from_rows(rows)
            self._apply()
            logger.info("config overrides from the store applied (%d)", len(rows))

    def request_reload(self) -> None:
        """Re-read the config file and the key files on the watcher's next round, changed or not.
        Safe to call from a signal handler."""
        self._reload_requested = True
        self.resources.request_reload()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        async with self.resources.lifespan(app):
            await self.sync_overrides()  # the first request already sees the stored overrides
            loop = asyncio.get_running_loop()
            # Two tasks: a store that is slow to answer never delays a look at the file.
            self._tasks = [loop.create_task(self._watch_overrides())]
            if self.source is not None:
                self._tasks.append(loop.create_task(self._watch(self.source)))
            try:
                yield
            finally:
                for task in self._tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _watch(self, source: ConfigFile) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY)
            forced, self._reload_requested = self._reload_requested, False
            if source.changed() or forced:
                self._reload_from(source)

    async def _watch_overrides(self) -> None:
        if self.resources.ledger is None:
            return
        while True:
            await asyncio.sleep(WATCH_EVERY)
            await self.sync_overrides()

    def _reload_from(self, source: ConfigFile) -> None:
        metrics = self.resources.metrics
        try:
            self.reload(source.load())
        except ConfigError as exc:
            for problem in exc.problems:  # once per change: the file is read again only when it changes
                logger.error("config %s not reloaded: %s", source.path, problem)
            metrics.add(metrics.config_reloads, ("error",))
            return
        metrics.add(metrics.config_reloads, ("ok",))


class LiveLayers:
    """The outermost middleware of a proxykit app: hands each request to the layers of the
    config running when it arrived.

        Middleware(LiveLayers, live=live)
    """

    def __init__(self, app: ASGIApp, *, live: Live) -> None:
        live.attach(app)
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        layers = self.live.layers
        assert layers is not None
        await layers(scope, receive, send)
