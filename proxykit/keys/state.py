"""What proxykit knows of one upstream key: whether it is available, resting or set aside, its
token buckets, its recent time to first byte, and why it rests."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxykit.config import Deployment, UpstreamKey
from proxykit.outcomes import RestReason


class KeyStatus(enum.Enum):
    AVAILABLE = "available"
    RESTING = "resting"
    SET_ASIDE = "set_aside"


@dataclass(slots=True, eq=False)
class KeyState:
    """One upstream key of one deployment, and everything proxykit has learnt about it."""

    deployment: Deployment
    key: UpstreamKey
    until: float = 0.0  # resting or set aside until then (monotonic seconds)
    set_aside: bool = False  # waits for a successful probe, not only for `until`
    reason: RestReason | None = None  # why it rests
    failures: int = 0  # consecutive 5xx / connect failures
    in_flight: int = 0
    last_used: int = 0  # sequence number of the last choice: least recently used goes first
    request_tat: float = 0.0  # GCRA: when this key's request bucket would be empty again
    token_tat: float = 0.0
    ttfb: float | None = None  # moving average of the time to first byte
    stride_pass: float = 0.0  # weighted strategy: advances by 1/share on each use
    version: int = 0  # bumps whenever the priority changes; older heap entries are stale
    in_heap: bool = False
    retired: bool = False  # removed from the config or its key file; may still finish requests in flight
    disabled: bool = False  # taken out of rotation by an operator (management API), until put back

    @property
    def alias(self) -> str:
        return self.key.alias

    @property
    def secret(self) -> str:
        return self.key.secret

    def status(self, now: float) -> KeyStatus:
        if self.set_aside or self.disabled:
            return KeyStatus.SET_ASIDE
        return KeyStatus.RESTING if self.until > now else KeyStatus.AVAILABLE

    def has_room(self, now: float) -> bool:
        """Whether one more request fits this key's configured rpm/tpm (a token bucket)."""
        return self.request_tat - now <= 60.0 - interval(self.deployment.rpm) + 1e-9 and (
            self.deployment.tpm is None or self.token_tat - now <= 60.0
        )


def interval(per_minute: int | None) -> float:
    """Seconds of bucket one unit takes; keys without a limit still count a sliver, so usage spreads."""
    return 60.0 / per_minute if per_minute else 1e-6


@dataclass(frozen=True, slots=True)
class NoKey:
    """Why no key could be chosen: for the 503 message and its Retry-After."""

    model: str
    total: int
    reasons: tuple[RestReason, ...]
    retry_after: float  # seconds until the soonest key returns (or has room)


def room_in(state: KeyState, now: float) -> float:
    return max(0.0, state.request_tat - now - 60.0 + interval(state.deployment.rpm))
