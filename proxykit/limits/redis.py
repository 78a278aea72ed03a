"""Limits and key state shared by every replica through Redis (`limits.backend: redis`).

Every bucket is one Redis key holding its GCRA "empty at" time, updated by a Lua script in one
round trip and expiring once the bucket is empty, so nothing grows without bound. Key rests and
set-asides are Redis keys that expire with the rest. If Redis goes away, proxykit serves on with
per-process limits, logs one warning, and goes back to Redis when it answers again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from proxykit.keys.pool import KeyPool
from proxykit.keys.state import KeyState
from proxykit.limits.base import WINDOW, Admission, MemoryRateLimiter, Take
from proxykit.outcomes import RestReason

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

PREFIX: Final = "proxykit:"
_RETRY_REDIS_AFTER: Final = 1.0  # seconds on per-process limits before Redis is tried again
_NOW_MS: Final = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# KEYS[i] a bucket; ARGV amount, limit, window ms for each. Every bucket is taken, or none. Returns
# {allowed, occupancy ms, retry-after ms} per bucket, as strings (Redis truncates Lua numbers).
_ADMIT: Final = _NOW_MS + """
local verdicts, tats, all = {}, {}, true
for i = 1, #KEYS do
  local amount, limit, window = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  local base = math.max(tat, now)
  tats[i] = base + amount * window / limit
  if tats[i] - now > window + 0.001 then
    all = false
    verdicts[i] = {0, tostring(base - now), tostring(tats[i] - now - window)}
  else
    verdicts[i] = {1, tostring(tats[i] - now), '0'}
  end
end
if all then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], tostring(tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
  end
end
return verdicts
"""
_SETTLE: Final = _NOW_MS + """
local interval = tonumber(ARGV[3]) / tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
local new_tat = math.max(now, math.max(tat, now) + tonumber(ARGV[1]) * interval)
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return 1
"""


class RedisConnection:
    """One lazily made client, and whether Redis is reachable right now."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Redis | None = None
        self._down_until = 0.0
        self._down = False

    @property
    def usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def client(self) -> Redis:
        if self._client is None:
            from redis.asyncio import Redis

            # Short timeouts: a missing Redis must cost a request milliseconds, not seconds.
            self._client = Redis.from_url(self.url, socket_timeout=0.25, socket_connect_timeout=0.25)
        return self._client

    def failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + _RETRY_REDIS_AFTER
        if not self._down:
            self._down = True
            logger.warning("Redis is unavailable (%s): limits are per process until it returns", type(exc).__name__)

    def answered(self) -> None:
        if self._down:
            self._down = False
            logger.warning("Redis is back: limits are shared again")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def redis_errors() -> tuple[type[Exception], ...]:
    from redis.exceptions import ConnectionError, TimeoutError

    return ConnectionError, TimeoutError, OSError


class RedisRateLimiter:
    """The `RateLimiter` of `limits.backend: redis`: one global limit for every replica."""

    def __init__(self, connection: RedisConnection) -> None:
        self.connection = connection
        self.fallback = MemoryRateLimiter()
        self._errors = redis_errors()
        self._scripts: dict[str, Any] = {}  # registered on first use, when the client exists

    async def admit_all(self, takes: Sequence[Take]) -> list[Admission]:
        if self.connection.usable:
            args = [value for _, amount, limit in takes for value in (amount, limit, WINDOW * 1000)]
            try:
                verdicts = await self._script("admit")(keys=[PREFIX + key for key, _, _ in takes], args=args)
            except self._errors as exc:
                self.connection.failed(exc)
            else:
                self.connection.answered()
                return [_admission(verdict, limit) for verdict, (_, _, limit) in zip(verdicts, takes, strict=True)]
        return await self.fallback.admit_all(takes)

    async def settle(self, key: str, amount: float, *, limit: int) -> None:
        if self.connection.usable:
            try:
                await self._script("settle")(keys=[PREFIX + key], args=[amount, limit, WINDOW * 1000])
            except self._errors as exc:
                self.connection.failed(exc)
            else:
                self.connection.answered()
                return
        await self.fallback.settle(key, amount, limit=limit)

    def _script(self, name: str) -> Any:
        if not self._scripts:
            client = self.connection.client()
            self._scripts = {"admit": client.register_script(_ADMIT), "settle": client.register_script(_SETTLE)}
        return self._scripts[name]


def _admission(verdict: list[Any], limit: int) -> Admission:
    allowed, occupancy, retry_after = verdict
    used = float(occupancy) / 1000
    remaining = max(0, math.floor((WINDOW - used) / (WINDOW / limit) + 1e-9))
    return Admission(bool(int(allowed)), limit, remaining, float(retry_after) / 1000, used)


class SharedKeyStates:
    """Rests and set-asides of upstream keys, written to Redis when they happen here and read back
    by every replica's upkeep loop, so a key a 429 rested in one process is avoided by all."""

    def __init__(self, connection: RedisConnection, pool: KeyPool) -> None:
        self.connection = connection
        self.pool = pool
        self._errors = redis_errors()

    async def publish(self, state: KeyState) -> None:
        seconds = state.until - self.pool.clock()
        if seconds <= 0 or not self.connection.usable:
            return
        value = f"{time.time() + seconds}:{int(state.set_aside)}:{state.reason or ''}"
        try:
            await self.connection.client().set(_state_key(state), value, px=math.ceil(seconds * 1000))
        except self._errors as exc:
            self.connection.failed(exc)

    async def sync(self) -> None:
        """Apply the rests other replicas published."""
        states = list(self.pool.all_keys())
        if not states or not self.connection.usable:
            return
        try:
            values = await self.connection.client().mget([_state_key(state) for state in states])
        except self._errors as exc:
            self.connection.failed(exc)
            return
        self.connection.answered()
        for state, value in zip(states, values, strict=True):
            if value is not None:
                text = value.decode() if isinstance(value, bytes) else value
                until_epoch, set_aside, reason = text.split(":", 2)
                self.pool.rest_until(state, self.pool.clock() + float(until_epoch) - time.time(),
                                     reason=_reason(reason), set_aside=set_aside == "1")


def _state_key(state: KeyState) -> str:
    return f"{PREFIX}key:{state.deployment.name}:{state.alias}"


def _reason(text: str) -> RestReason | None:
    """A rest reason as another replica wrote it; one this version does not know is a plain rest."""
    try:
        return RestReason(text) if text else None
    except ValueError:
        return RestReason.RESTING
