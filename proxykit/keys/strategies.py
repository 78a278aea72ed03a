"""Routing strategies as priority functions: the key pool keeps each model's keys in a min-heap by
`(priority(key), last_used)`, so every strategy chooses in O(log n) and ties go to the least
recently used key."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

from proxykit.keys.state import KeyState

Priority = Callable[[KeyState], tuple[float, ...]]
_LATENCY_BAND: Final = math.log(1.25)  # keys within ~25% of each other's TTFB share the load


def _round_robin(key: KeyState) -> tuple[float, ...]:
    return ()  # only `last_used` orders: exactly even over the available keys


def _least_busy(key: KeyState) -> tuple[float, ...]:
    return (key.in_flight,)


def _usage_based(key: KeyState) -> tuple[float, ...]:
    # A bucket's "empty at" time orders keys by the share of their rpm/tpm in use, whatever their
    # limits: share used = (empty_at - now) / 60 s for every key, so the order holds as time passes.
    return (max(key.request_tat, key.token_tat),)


def _weighted(key: KeyState) -> tuple[float, ...]:
    return (key.stride_pass,)  # stride scheduling: each use advances a key by 1 / its share


def _latency_based(key: KeyState) -> tuple[float, ...]:
    if key.ttfb is None:
        return (-1.0,)  # no first byte seen from it yet: try it
    return (math.floor(math.log1p(key.ttfb * 1000) / _LATENCY_BAND),)


# Strategies whose priority changes when an attempt ends (in-flight count, recent TTFB): only
# their keys are re-ranked then. The others change only when a key is chosen or rests.
RANK_ON_RELEASE: Final = frozenset({"least-busy", "latency-based"})

PRIORITIES: Final[dict[str, Priority]] = {
    "round-robin": _round_robin,
    "least-busy": _least_busy,
    "usage-based": _usage_based,
    "weighted": _weighted,
    "latency-based": _latency_based,
}
