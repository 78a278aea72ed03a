"""The choice of a key for one attempt across a model and its fallbacks, and what the answer does
to that key: CONTRACT section 3's rule in one place, for the rotation layer and for the forwarder
used alone.

    chosen = choose_key(pool, model, tried=tried, skip_deployments=skip)
    reason = learn(pool, state, status, outcome, headers, ttfb)
    raise no_key_error(pool.why_none(model.name))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from proxykit.config import ModelConfig
from proxykit.errors import NoUpstreamAvailable
from proxykit.keys.pool import KeyPool
from proxykit.keys.state import KeyState, NoKey
from proxykit.outcomes import Outcome, RestReason

logger = logging.getLogger(__name__)

_DESCRIPTIONS = {
    RestReason.RATE_LIMITED: "rate limited (429)",
    RestReason.FAILURES: "failing",
    RestReason.AUTH_ERROR: "set aside after 401/403",
    RestReason.EXHAUSTED: "out of upstream quota",
    RestReason.FULL: "at their rpm/tpm limit",
    RestReason.RESTING: "resting",
    RestReason.DISABLED: "disabled",
}


def choose_key(
    pool: KeyPool, model: ModelConfig, *, tried: list[KeyState], skip_deployments: set[str],
) -> tuple[KeyState, str] | None:
    """A key and the name of the model entry it serves (the model's own, or a fallback's).

    Keys this request has not tried come first, then tried ones that are still available (the
    retry layer has backed off meanwhile); deployments that failed to connect are skipped only
    while another deployment has a key."""
    names = (model.name, *(name for name in model.fallbacks if _enabled(pool, name)))
    passes: list[tuple[list[KeyState], set[str]]] = [(tried, skip_deployments)]
    if tried:
        passes.append(([], skip_deployments))
    if skip_deployments:
        passes += [(tried, set()), ([], set())]
    for exclude, skip in passes:
        for name in names:
            state = pool.choose(name, exclude=exclude, skip_deployments=skip)
            if state is not None:
                return state, name
    return None


def _enabled(pool: KeyPool, name: str) -> bool:
    """A disabled model is no one's fallback."""
    keys = pool.models.get(name)
    return keys is not None and keys.model.enabled


def soonest_return(pool: KeyPool, model: ModelConfig) -> float:
    """Seconds until a key of the model or of a fallback is available again."""
    return min(pool.why_none(name).retry_after for name in (model.name, *model.fallbacks))


def learn(
    pool: KeyPool, state: KeyState, status: int, outcome: Outcome,
    raw_headers: Iterable[tuple[bytes, bytes]], ttfb: float | None,
) -> RestReason | None:
    """Applies an upstream answer to the key that got it; returns (and logs) why the key now
    rests, if it does."""
    if status in (401, 403):
        outcome = Outcome.AUTH_ERROR  # the key's fault, not the client's
    headers = {  # only what key state reads: rate-limit and retry-after headers
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in raw_headers if name.lower().startswith((b"x-ratelimit-", b"retry-after"))
    }
    reason = pool.record(state, outcome, headers, ttfb)
    if reason:
        logger.warning("upstream key %s is %s", state.alias, _describe(reason))
    return reason


def no_key_error(why: NoKey) -> NoUpstreamAvailable:
    """The 503 of a request that found no key to use, with `Retry-After` the soonest return."""
    seconds = max(1, math.ceil(why.retry_after))
    reasons = ", ".join(_describe(reason) for reason in why.reasons) or "unavailable"
    message = (
        f"no upstream key of {why.model} is available: all {why.total} keys are {reasons}; "
        f"the first returns in {seconds} s"
    )
    return NoUpstreamAvailable(message, headers={"retry-after": str(seconds)})


def _describe(reason: RestReason) -> str:
    return _DESCRIPTIONS.get(reason, str(reason))
