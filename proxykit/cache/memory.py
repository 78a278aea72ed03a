"""Entries in this process, bounded in bytes: the least recently used leave first.

    cache = MemoryCache(max_bytes=256 * 2**20)
"""

from __future__ import annotations

import time
from collections import OrderedDict

from proxykit.cache.base import CacheEntry


class MemoryCache:
    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[CacheEntry, float]] = OrderedDict()  # key -> (entry, expires at)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CacheEntry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        entry, expires = found
        if time.time() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)  # just used: the last to leave
        return entry

    async def set(self, key: str, entry: CacheEntry, ttl: float) -> None:
        if entry.size > self.max_bytes // 10:  # one answer must not push out the whole cache
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (entry, time.time() + ttl)
        self.bytes += entry.size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry, _ = self._entries.pop(key)
        self.bytes -= entry.size

    async def aclose(self) -> None:
        self._entries.clear()
        self.bytes = 0
