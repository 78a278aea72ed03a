"""Numbers an upstream sends in headers: `Retry-After`, `retry-after-ms`, `x-ratelimit-*`.

    retry_after({"retry-after": "2"})     # 2.0
    reset_duration("6m0s")                # 360.0

Every value is bounded: a hostile or broken upstream that says `Retry-After: 1e300` rests a key
for `MAX_WAIT` at most, never for ever, and never overflows a later computation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

MAX_WAIT: Final = 86_400.0  # a day: the longest any upstream's quota window plausibly lasts
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_TEXT: Final = 64  # longer values are not numbers any upstream sends


def number(value: str | None) -> float | None:
    """A finite, non-negative number, or None."""
    if value is None or len(value) > _MAX_TEXT:
        return None
    try:
        parsed = float(value)
    except ValueError:
        return None
    return parsed if math.isfinite(parsed) and parsed >= 0 else None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI's) or `retry-after` (seconds), at most `MAX_WAIT`.
    An HTTP-date is not read: LLM upstreams send seconds."""
    if (ms := number(headers.get("retry-after-ms"))) is not None:
        return min(ms / 1000, MAX_WAIT)
    if (seconds := number(headers.get("retry-after"))) is not None:
        return min(seconds, MAX_WAIT)
    return None


def reset_duration(value: str | None) -> float | None:
    """OpenAI's reset durations: "1s", "6m0s", "20ms", "1h2m3.5s"; a bare number is seconds.
    At most `MAX_WAIT`."""
    if value is None or len(value) > _MAX_TEXT:
        return None
    if (plain := number(value)) is not None:
        return min(plain, MAX_WAIT)
    total, digits, text = 0.0, "", value.strip()
    i = 0
    while i < len(text):
        char = text[i]
        if char.isdigit() or char == ".":
            digits += char
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else char
        if unit not in _UNITS or (amount := number(digits)) is None:
            return None
        total += amount * _UNITS[unit]
        digits, i = "", i + len(unit)
    return min(total, MAX_WAIT) if not digits else None
