"""Active health checks: an unbilled `GET {base_url}/models` per deployment every
`health.interval` seconds, with one of its keys. `failure_threshold` failed checks in a row mark
a deployment unhealthy, and routing skips it while its model has a healthy one;
`recovery_threshold` passed checks in a row bring it back. Never a completion: a probe must cost
nothing.

    checks = HealthChecks(pool, client)
    task_group.start_soon(checks.run)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

import anyio
import httpx

from proxykit.config import Deployment
from proxykit.keys.pool import KeyPool
from proxykit.upstream.target import deployment_headers, join_url

logger = logging.getLogger(__name__)

MAX_TIMEOUT: Final = 10.0  # seconds a check may take, at most (and never more than the interval)
IDLE_LOOK: Final = 1.0  # with checks off, how often to look whether a reload turned them on


@dataclass(slots=True)
class Health:
    healthy: bool = True
    failures: int = 0  # in a row
    passes: int = 0  # in a row, while unhealthy
    last_check: float | None = None  # epoch seconds
    last_result: str | None = None  # "ok", "http_503", "connect_error", ...


class HealthChecks:
    def __init__(self, pool: KeyPool, client: httpx.AsyncClient) -> None:
        self.pool = pool
        self.client = client
        self.deployments: dict[str, Health] = {}

    def of(self, deployment: str) -> Health:
        return self.deployments.get(deployment) or Health()

    async def run(self) -> None:
        """Checks every interval, the first one interval after start: deployments start healthy."""
        while True:
            interval = self.pool.config.health.interval
            if interval <= 0:
                self._forget()
                await anyio.sleep(IDLE_LOOK)
                continue
            await anyio.sleep(interval)
            try:
                await self.check_all(min(MAX_TIMEOUT, interval))
            except Exception:  # a bug must not end the checks for good
                logger.exception("health checks failed")

    async def check_all(self, timeout: float) -> None:
        deployments = {deployment.name: deployment for deployment in self.pool.config.deployments}
        for gone in set(self.deployments) - set(deployments):  # removed by a reload
            del self.deployments[gone]
            self.pool.unhealthy.discard(gone)
        async with anyio.create_task_group() as group:
            for deployment in deployments.values():
                group.start_soon(self._check, deployment, timeout)

    async def _check(self, deployment: Deployment, timeout: float) -> None:
        keys = [state for state in self.pool.all_keys()
                if state.deployment.name == deployment.name and not state.retired and not state.disabled]
        secret = keys[0].secret if keys else ""
        request = httpx.Request("GET", join_url(deployment.base_url, "/models"),
                                headers=deployment_headers(deployment, secret))
        try:
            with anyio.fail_after(timeout):
                response = await self.client.send(request)
                await response.aclose()
        except TimeoutError:
            result = "timeout"
        except httpx.HTTPError:
            result = "connect_error"
        else:
            # A 429 or a refused key is the key's state, not the deployment's: only a server error fails.
            result = "ok" if response.status_code < 500 else f"http_{response.status_code}"
        self._record(deployment.name, result)

    def _record(self, name: str, result: str) -> None:
        health = self.deployments.setdefault(name, Health())
        health.last_check, health.last_result = time.time(), result
        thresholds = self.pool.config.health
        if result != "ok":
            health.failures, health.passes = health.failures + 1, 0
            if health.healthy and health.failures >= max(1, thresholds.failure_threshold):
                health.healthy = False
                self.pool.unhealthy.add(name)
                logger.warning("deployment %s is unhealthy: %d checks failed in a row (%s)", name,
                               health.failures, result)
            return
        health.failures = 0
        if not health.healthy:
            health.passes += 1
            if health.passes >= max(1, thresholds.recovery_threshold):
                health.healthy, health.passes = True, 0
                self.pool.unhealthy.discard(name)
                logger.info("deployment %s is healthy again", name)

    def _forget(self) -> None:
        """Checks turned off: nothing is held against any deployment."""
        self.deployments.clear()
        self.pool.unhealthy.clear()
