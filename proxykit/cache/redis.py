"""Entries in Redis, shared by every replica, each expiring with its TTL.

    cache = RedisCache(connection)   # the same connection as the shared limits
"""

from __future__ import annotations

import logging
from typing import Final

from proxykit.cache.base import CacheEntry
from proxykit.limits.redis import RedisConnection, redis_errors

logger = logging.getLogger(__name__)

PREFIX: Final = "proxykit:cache:"
MAX_ENTRY_BYTES: Final = 8 * 1024 * 1024  # an answer larger than this is not sent to Redis


class RedisCache:
    def __init__(self, connection: RedisConnection) -> None:
        self.connection = connection

    async def get(self, key: str) -> CacheEntry | None:
        if not self.connection.usable:
            return None
        try:
            data = await self.connection.client().get(PREFIX + key)
        except redis_errors() as exc:
            self.connection.failed(exc)
            return None
        self.connection.answered()
        return CacheEntry.unpack(data) if isinstance(data, bytes) else None

    async def set(self, key: str, packed: bytes, ttl: float) -> None:
        if len(packed) > MAX_ENTRY_BYTES or not self.connection.usable:
            return
        try:
            await self.connection.client().set(PREFIX + key, packed, px=max(1, int(ttl * 1000)))
        except redis_errors() as exc:
            self.connection.failed(exc)
            return
        self.connection.answered()

    async def aclose(self) -> None:
        """The connection is the limits' too: whoever made it closes it."""
