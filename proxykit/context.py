"""Per-request state, shared by every layer through the ASGI scope.

    ctx = ensure_context(scope)   # in a middleware
    ctx = get_context(request.scope)   # in a host app's endpoint
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from starlette.types import Scope

if TYPE_CHECKING:
    from proxykit.keys import KeyState

SCOPE_KEY: Final = "proxykit.context"
_VALID_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass(slots=True)
class RequestContext:
    request_id: str
    body: bytes | None = None  # read once, bounded by max_body_bytes; replayed per attempt
    payload: dict[str, Any] | None = None  # the body parsed as a JSON object
    model: str = "unknown"  # the configured model name once resolved: a safe metrics label
    client: str = "anonymous"  # the configured client key *name*; the secret never lands here
    allowed_models: tuple[str, ...] | None = None  # the client's allow-list (globs); None allows all
    deployment: str | None = None
    key_alias: str | None = None  # the upstream key's alias, never the key
    key: KeyState | None = None  # the key chosen for the current attempt
    tried: list[KeyState] = field(default_factory=list)  # keys this request has used
    skip_deployments: set[str] = field(default_factory=set)  # deployments that failed to connect
    no_upstream: bool = False  # the current attempt found no key to use
    next_key_in: float | None = None  # then: seconds until the soonest resting key returns
    key_waits: int = 0  # times this request waited for a resting key
    rate_limited: str | None = None  # "rpm" or "tpm" when a client limit refused the request
    attempt: int = 0
    attempt_started: float = 0.0
    outcome: str | None = None  # "ok", "http_429", "connect_error", ... as in the metrics contract
    attempts: list[tuple[str, str, str]] | None = None  # (deployment, key alias, outcome) per attempt
    served_by: str | None = None  # the model entry whose key answered: the requested one or a fallback
    on_model: Callable[[str], None] | None = None  # told once the model is known (metrics' in-flight)
    usage: dict[str, Any] | None = None  # the upstream's token usage, plain or streamed
    injected_usage: bool = False  # proxykit asked a stream for usage the client did not ask for
    sent_events: int = 0  # stream events relayed: the token estimate for a stream cut short
    upstream_wait: float = 0.0  # seconds spent waiting on the upstream, for the overhead metric
    backoff_wait: float = 0.0  # seconds spent waiting between attempts
    status: int | None = None  # the status sent to the client
    started: float = field(default_factory=time.perf_counter)
    ttfb: float | None = None  # seconds from `started` to the upstream's headers
    attempt_ttfb: float | None = None  # the same, for the current attempt alone
    finished: bool = False  # the whole response went out
    disconnected: bool = False

    def set_model(self, name: str) -> None:
        self.model = name
        if self.on_model is not None:
            self.on_model(name)

    def record_attempt(self, outcome: str) -> None:
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
