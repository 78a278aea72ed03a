"""Keeps the key pool current in the background: probes set-aside keys, re-reads key files."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Final

import anyio
import httpx

from proxykit.config import Config
from proxykit.config.reader import read_key_file
from proxykit.keys.pool import KeyPool
from proxykit.keys.state import KeyState
from proxykit.outcomes import Outcome
from proxykit.upstream.target import deployment_headers, join_url

if TYPE_CHECKING:
    from proxykit.limits.redis import SharedKeyStates

logger = logging.getLogger(__name__)

PROBE_TIMEOUT: Final = 10.0
_RETRY_PROBE_AFTER: Final = 30.0  # a probe that got no clear answer is tried again this much later


class PoolUpkeep:
    """Every `interval` seconds: probes each set-aside key whose time is up with `GET /models`
    (free, unlike a completion) and re-reads every `file:` key list that changed on disk, or all
    of them after `request_reload()` (SIGHUP in `proxykit serve`).

        upkeep = PoolUpkeep(pool, client)
        task_group.start_soon(upkeep.run)
    """

    def __init__(
        self, pool: KeyPool, client: httpx.AsyncClient, *, interval: float = 1.0, shared: SharedKeyStates | None = None
    ) -> None:
        self.pool = pool
        self.client = client
        self.interval = interval
        self.shared = shared  # rests published by other replicas, with `limits.backend: redis`
        self._reload_requested = False
        self._files: dict[str, tuple[str, float | None]] = {}
        self.follow(pool.config)

    def follow(self, config: Config) -> None:
        """Watches the key files `config` names (a reload read them just now)."""
        self._files = {
            deployment.name: (deployment.keys_file, _mtime(deployment.keys_file))
            for deployment in config.deployments if deployment.keys_file
        }

    def request_reload(self) -> None:
        """Safe to call from a signal handler: the loop picks it up on its next round."""
        self._reload_requested = True

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            self.reload_changed_files()
            if self.shared is not None:
                await self.shared.sync()
            for state in self.pool.due_for_probe():
                await self.probe(state)

    def reload_changed_files(self) -> None:
        forced, self._reload_requested = self._reload_requested, False
        for deployment, (path, seen) in self._files.items():
            mtime = _mtime(path)
            if mtime == seen and not forced:
                continue
            self._files[deployment] = (path, mtime)
            try:
                secrets = read_key_file(path)
            except OSError as exc:
                logger.warning("cannot re-read the key file of %s (%s): keeping its keys", deployment, exc.strerror)
                continue
            except ValueError as exc:
                logger.warning("cannot use the key file of %s (%s): keeping its keys", deployment, exc)
                continue
            if not secrets:
                logger.warning("the key file of %s is empty: keeping its keys", deployment)
                continue
            added, removed = self.pool.replace_keys(deployment, secrets)
            logger.info("re-read the key file of %s: %d keys (%d new, %d removed)",
                           deployment, len(secrets), added, removed)

    async def probe(self, state: KeyState) -> None:
        request = httpx.Request(
            "GET", join_url(state.deployment.base_url, "/models"),
            headers=deployment_headers(state.deployment, state.secret),
        )
        try:
            with anyio.fail_after(PROBE_TIMEOUT):
                response = await self.client.send(request)
                await response.aclose()
        except (httpx.HTTPError, TimeoutError):
            self.pool.postpone(state, _RETRY_PROBE_AFTER)
            return
        if response.status_code < 400:
            self.pool.recovered(state)
            logger.info("upstream key %s passed its probe: back in rotation", state.alias)
        elif response.status_code in (401, 403):
            self.pool.record(state, Outcome.AUTH_ERROR)  # still refused: set aside for another round
        else:
            self.pool.postpone(state, _RETRY_PROBE_AFTER)


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None
