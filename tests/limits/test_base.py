"""The in-memory GCRA limiter: charges, refunds and all-or-nothing admission."""

from __future__ import annotations

import pytest

from proxykit.limits.base import Admission, MemoryRateLimiter

pytestmark = pytest.mark.anyio


async def test_memory_limiter_settles_charges_and_refunds() -> None:
    clock = [0.0]
    limiter = MemoryRateLimiter(clock=lambda: clock[0])

    async def admit(key: str, amount: float) -> Admission:
        [admission] = await limiter.admit_all([(key, amount, 100)])
        return admission

    assert (await admit("k", 50)).allowed
    await limiter.settle("k", 40, limit=100)  # used 90 in all
    assert not (await admit("k", 20)).allowed
    await limiter.settle("k", -80, limit=100)  # a refund
    admission = await admit("k", 20)
    assert admission.allowed and admission.remaining == 70
    clock[0] += 60
    assert (await admit("k", 100)).allowed  # a minute later the bucket is empty


async def test_admit_all_takes_every_bucket_or_none() -> None:
    limiter = MemoryRateLimiter(clock=lambda: 0.0)
    first = await limiter.admit_all([("requests", 1, 10), ("tokens", 90, 100)])
    refused = await limiter.admit_all([("requests", 1, 10), ("tokens", 20, 100)])  # tokens do not fit
    after = await limiter.admit_all([("requests", 1, 10)])
    assert [a.allowed for a in first] == [True, True]
    assert [a.allowed for a in refused] == [True, False]
    assert after[0].remaining == 8  # the refused request took nothing from the requests bucket
