"""Per-request state, shared by every layer through the ASGI scope.

    ctx = ensure_context(scope)   # in a middleware
    ctx = get_context(request.scope)   # in a host app's endpoint

Fields come in three groups: what the request is, what the current upstream attempt is, and what
came of it. Beside each: who writes it -> who reads it.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from starlette.types import Scope

from proxykit.outcomes import Outcome
from proxykit.usage.accounting import TokenCounts, counts

if TYPE_CHECKING:
    from proxykit.keys.state import KeyState

SCOPE_KEY: Final = "proxykit.context"
_VALID_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass(slots=True)
class RequestContext:
    # The request
    request_id: str  # ensure_context -> logs, responses, upstream headers
    body: bytes | None = None  # body.ensure_body (bounded, read once) -> every attempt, limits, metrics
    payload: dict[str, Any] | None = None  # body.ensure_payload -> rotation, limits, forwarder
    model: str = "unknown"  # rotation or forwarder (set_model), a configured name -> metrics, access log
    client: str = "anonymous"  # auth: the client key's *name*, never the secret -> metrics, limits, log
    allowed_models: tuple[str, ...] | None = None  # auth: the client's globs -> rotation, forwarder, /v1/models
    admin: bool = False  # auth: an `admin: true` key (or loopback with auth off) -> management API
    on_model: Callable[[str], None] | None = None  # metrics: told when the model is known -> set_model
    started: float = field(default_factory=time.perf_counter)  # -> durations, the retry deadline
    rate_limited: str | None = None  # ratelimit: "rpm" or "tpm" when it refused -> metrics
    budget_refused: bool = False  # budget: it refused -> metrics
    # The current upstream attempt
    attempt: int = 0  # retry: 0 for the first -> retry (the last one passes its error through)
    key: KeyState | None = None  # rotation (or the forwarder alone) -> forwarder: the key to send with
    deployment: str | None = None  # rotation -> attempts list, metrics
    key_alias: str | None = None  # rotation -> attempts list, access log
    served_by: str | None = None  # rotation: the model entry whose key it is (a fallback's?) -> pricing
    tried: list[KeyState] = field(default_factory=list)  # rotation -> rotation: untried keys go first
    skip_deployments: set[str] = field(default_factory=set)  # rotation, after a connect failure -> rotation
    no_upstream: bool = False  # rotation: no key for this attempt -> retry (waits, or gives up)
    next_key_in: float | None = None  # rotation: then, seconds until the soonest key returns -> retry
    key_waits: int = 0  # retry: times it waited for a resting key -> retry (bounded)
    attempt_started: float = 0.0  # forwarder -> forwarder (attempt_ttfb)
    injected_usage: bool = False  # forwarder: it asked the stream for usage -> forwarder (strips it again)
    # What came of it
    outcome: Outcome | None = None  # forwarder, per attempt (None: no upstream asked) -> retry, rotation
    attempts: list[tuple[str, str, Outcome]] | None = None  # forwarder -> x-proxykit-attempts, metrics
    ttfb: float | None = None  # forwarder: seconds from `started` to the upstream's headers -> access log
    attempt_ttfb: float | None = None  # forwarder: the same, this attempt alone -> rotation (latency)
    usage: dict[str, Any] | None = None  # forwarder: the upstream's usage, plain or streamed -> metrics, limits
    sent_events: int = 0  # forwarder: stream events relayed -> the estimate for a stream cut short
    upstream_wait: float = 0.0  # forwarder: seconds waiting on the upstream -> metrics (overhead)
    backoff_wait: float = 0.0  # retry: seconds between attempts -> metrics (overhead)
    status: int | None = None  # request id layer: the status sent -> access log
    cache: str | None = None  # cache: "hit", "miss" or "bypass" on a cacheable route -> metrics
    cache_saved_tokens: int = 0  # cache: the tokens a hit's stored answer holds -> metrics
    cache_hit_tokens: TokenCounts | None = None  # cache: a hit's stored prompt and completion -> store
    settled: tuple[TokenCounts, float] | None = None  # settle(): tokens and cost, once -> metrics, store
    stripped_usage_event: bytes | None = None  # forwarder: the usage event it took out -> cache (stores it)
    finished: bool = False  # forwarder: the whole response went out -> disconnect watch
    disconnected: bool = False  # whoever sees the client leave -> every layer: stop, never retry
    _counted: tuple[dict[str, Any] | None, TokenCounts] | None = None  # usage_counts(): of which usage

    def usage_counts(self) -> TokenCounts:
        """`counts(self.usage)`, worked out once for the limits, the cache and settle()."""
        usage = self.usage
        if self._counted is None or self._counted[0] is not usage:
            self._counted = (usage, counts(usage))
        return self._counted[1]

    def set_model(self, name: str) -> None:
        self.model = name
        if self.on_model is not None:
            self.on_model(name)

    def record_attempt(self, outcome: Outcome) -> None:
        self.outcome = outcome
        entry = (self.deployment or "-", self.key_alias or "-", outcome)
        if self.attempts is None:
            self.attempts = [entry]
        else:
            self.attempts.append(entry)

    def attempts_header(self) -> str:
        """`alias:outcome` per attempt, e.g. `deepseek#3:http_429,deepseek#7:ok`."""
        return ",".join(f"{alias}:{outcome}" for _, alias, outcome in self.attempts or ())


def ensure_context(scope: Scope) -> RequestContext:
    ctx: RequestContext | None = scope.get(SCOPE_KEY)
    if ctx is None:
        ctx = scope[SCOPE_KEY] = RequestContext(request_id=_incoming_or_new_id(scope))
    return ctx


def get_context(scope: Scope) -> RequestContext | None:
    """The proxykit context of a request, for host endpoints; None outside proxykit."""
    return scope.get(SCOPE_KEY)


def _incoming_or_new_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            # Only a short, plain token is trusted: it lands in logs and upstream headers.
            text: str = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(text):
                return text
            break
    # 128 random bits as hex, like uuid4().hex: unique, not secret, so no system call per request.
    return f"{random.getrandbits(128):032x}"
