"""Rate limits as token buckets, with aiolimiter's semantics: a burst of up to `limit` is admitted
at once, then `limit / 60` a second. Kept as GCRA ("the time the bucket would be empty"), which
is one number a bucket, so a Redis backend can run the same arithmetic atomically.

aiolimiter itself is not used: it can neither tell how much is left (for the `x-ratelimit-*`
headers), nor give back an unused token reservation, nor charge past capacity without blocking.

    limiter = MemoryRateLimiter()
    [admission] = await limiter.admit_all([("client:team-a:rpm", 1, 600)])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple, Protocol

WINDOW: Final = 60.0  # limits are per minute


class Admission(NamedTuple):  # a tuple: made twice a request, and cheaper to make than a dataclass
    allowed: bool
    limit: int
    remaining: int  # what fits now, after this admission
    retry_after: float  # seconds until this amount would fit (0 when allowed)
    reset: float  # seconds until the bucket is full again


Take = tuple[str, float, int]  # bucket key, amount, limit per minute


class RateLimiter(Protocol):
    """Where buckets live: this process (memory) or shared by every replica (Redis)."""

    async def admit_all(self, takes: Sequence[Take]) -> list[Admission]:
        """Take every amount if every one fits, else none: atomically, in one step (one round trip)."""

    async def settle(self, key: str, amount: float, *, limit: int) -> None:
        """Charge (positive) or give back (negative) `amount` without checking the limit."""


def gcra(tat: float, now: float, amount: float, limit: int) -> tuple[float, Admission]:
    """The new "empty at" time and the verdict, for a bucket last empty at `tat`."""
    interval = WINDOW / limit
    base = max(tat, now)
    new_tat = base + amount * interval
    if new_tat - now > WINDOW + 1e-9:
        remaining = max(0, math.floor((WINDOW - (base - now)) / interval))
        return tat, Admission(False, limit, remaining, new_tat - now - WINDOW, base - now)
    remaining = max(0, math.floor((WINDOW - (new_tat - now)) / interval + 1e-9))
    return new_tat, Admission(True, limit, remaining, 0.0, new_tat - now)


def settled(tat: float, now: float, amount: float, limit: int) -> float:
    return max(now, max(tat, now) + amount * WINDOW / limit)


class MemoryRateLimiter:
    """Buckets in this process: exact within it; with N replicas each admits its own `limit`."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}

    async def admit_all(self, takes: Sequence[Take]) -> list[Admission]:
        now = self.clock()
        tats, admissions = [], []
        for key, amount, limit in takes:
            tat, admission = gcra(self._tat.get(key, now), now, amount, limit)
            tats.append(tat)
            admissions.append(admission)
        for admission in admissions:
            if not admission.allowed:
                return admissions
        for (key, _, _), tat in zip(takes, tats, strict=True):
            self._tat[key] = tat
        return admissions

    async def settle(self, key: str, amount: float, *, limit: int) -> None:
        now = self.clock()
        self._tat[key] = settled(self._tat.get(key, now), now, amount, limit)
