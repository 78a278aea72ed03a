"""The vocabularies every layer shares: how an upstream attempt ended, and why a key rests.

    outcome_of(429)            # Outcome.HTTP_429
    f"{alias}:{Outcome.OK}"    # "deepseek#3:ok": StrEnum members are their strings

Both are `StrEnum`s: a member is the string the metrics contract and `x-proxykit-attempts` show.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """How one upstream attempt ended (the `outcome` label of `proxykit_upstream_attempts_total`)."""

    OK = "ok"
    HTTP_429 = "http_429"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"  # also an answer that is not valid HTTP: the attempt failed, not the connection
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    AUTH_ERROR = "auth_error"  # an upstream 401/403 as the key pool records it: the key's fault


# Failures of the connection, not of an answer: the deployment's other keys would fail alike.
CONNECTION_FAILURES = frozenset({Outcome.CONNECT_ERROR, Outcome.TIMEOUT})


def outcome_of(status: int) -> Outcome:
    if status < 400:
        return Outcome.OK
    if status == 429:
        return Outcome.HTTP_429
    return Outcome.HTTP_4XX if status < 500 else Outcome.HTTP_5XX


class RestReason(enum.StrEnum):
    """Why a key is not available (`/health/ready`'s reasons, the 503 message)."""

    RATE_LIMITED = "429"  # rests for the upstream's Retry-After, else cooldown.on_429
    FAILURES = "failures"  # cooldown.after_failures 5xx or connect failures in a row
    AUTH_ERROR = "auth_error"  # set aside after a 401/403 until a probe passes
    EXHAUSTED = "exhausted"  # the upstream said x-ratelimit-remaining-*: 0
    FULL = "full"  # at its own rpm/tpm bucket: available, but not now
    RESTING = "resting"  # resting for a reason this process did not see (another replica's)
    DISABLED = "disabled"  # taken out of rotation by an operator
