"""Live configuration: the layers every request passes are one swappable snapshot, built from
the running config; a new config builds new layers and swaps them in at once. A request in
flight keeps the layers it started with; what must outlive a swap (key state, limit buckets,
the cache, the store, the connection pool) lives in `Resources`, which takes the new config in
place.

    live = app.state.proxykit
    live.reload(new_config)        # a Config, a dict, or a path; raises ConfigError and changes nothing
    live.request_reload()          # SIGHUP: re-read the config file (and key files) soon

`proxykit serve --config FILE` (and `create_app(path)` with its lifespan run) re-reads the file
when it changes, checked every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit.config import Config, ConfigError
from proxykit.config.live import ConfigFile, keep_restart_only
from proxykit.config.reader import config_from_dict, load_config
from proxykit.resources import Resources

logger = logging.getLogger(__name__)

WATCH_EVERY: Final = 1.0  # seconds between looks at the config file

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
        self._task: asyncio.Task[None] | None = None

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
        config, warnings = keep_restart_only(self.config, config)
        for warning in warnings:
            logger.warning("%s", warning)
        added, retired = self.resources.apply(config)
        if self._inner is not None:
            self.layers, self.forwarding = self._build(self.resources, self._inner)
        logger.info("config reloaded: %d models, %d upstream keys added, %d retired",
                    len(config.models), added, retired)

    def request_reload(self) -> None:
        """Re-read the config file and the key files on the watcher's next round, changed or not.
        Safe to call from a signal handler."""
        self._reload_requested = True
        self.resources.request_reload()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        async with self.resources.lifespan(app):
            if self.source is not None:
                self._task = asyncio.get_running_loop().create_task(self._watch(self.source))
            try:
                yield
            finally:
                if self._task is not None:
                    self._task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._task

    async def _watch(self, source: ConfigFile) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY)
            forced, self._reload_requested = self._reload_requested, False
            if source.changed() or forced:
                self._reload_from(source)

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
