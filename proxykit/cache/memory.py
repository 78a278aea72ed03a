"""Entries in this process, bounded in bytes: the least recently used leave first.

    cache = MemoryCache(max_bytes=256 * 2**20)

Each entry is kept packed, one bytes object: thousands of entries give the garbage collector
nothing to walk, where entry objects would lengthen every full collection.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final

from proxykit.cache.base import CacheEntry

ENTRY_OVERHEAD: Final = 200  # bytes an entry costs beyond its packed form: its key and the slots that hold it


class MemoryCache:
    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (packed, expires at)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CacheEntry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        packed, expires = found
        if time.time() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)  # just used: the last to leave
        return CacheEntry.unpack(packed)

    async def set(self, key: str, packed: bytes, ttl: float) -> None:
        size = len(packed) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes // 10:  # one answer must not push out the whole cache
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (packed, time.time() + ttl)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        packed, _ = self._entries.pop(key)
        self.bytes -= len(packed) + len(key) + ENTRY_OVERHEAD

    async def aclose(self) -> None:
        self._entries.clear()
        self.bytes = 0
