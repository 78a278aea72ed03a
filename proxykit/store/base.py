"""What the store keeps, and the UTC periods budgets are counted in.

    row = UsageRow(time=..., request_id=..., ...)     # one finished LLM request, never a body or secret
    start, end = period_bounds("month", time.time())
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final, NamedTuple

# The `time` of a row is when its request arrived; hourly totals are keyed by that hour.
HOUR: Final = 3600


class UsageRow(NamedTuple):
    """One finished LLM request. A tuple, so a batch goes to the database driver as it is."""

    time: float  # epoch seconds, UTC
    request_id: str
    client: str  # the client key's name, or "anonymous"
    model: str  # what the body asked for (cut to 200 characters)
    served_model: str | None  # the model entry that answered (a fallback's name, when one did)
    deployment: str | None
    key: str | None  # the upstream key's alias, never the key
    path: str
    status: int
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int  # the provider's own prompt-cache count
    cost_usd: float
    duration_ms: float
    ttfb_ms: float | None
    attempts: int
    cache: str | None  # "hit", "miss", "bypass", or None off the cacheable routes
    totals_model: str  # the configured model (or "unknown"): hourly totals stay bounded by the config

    def as_json(self) -> dict[str, Any]:
        """The management API's shape of a row (CONTRACT section 9)."""
        data = self._asdict()
        del data["totals_model"]
        data["time"] = iso_time(self.time)
        data["stream"] = bool(self.stream)
        return data


def iso_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def period_bounds(period: str, now: float) -> tuple[float, float | None]:
    """The current UTC period holding `now`: its start, and its end (None for `total`). Weeks
    start on Monday."""
    if period == "total":
        return 0.0, None
    day = dt.datetime.fromtimestamp(now, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + dt.timedelta(days=1)
    elif period == "week":
        start = day - dt.timedelta(days=day.weekday())
        end = start + dt.timedelta(days=7)
    else:  # month
        start = day.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()
