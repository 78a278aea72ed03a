"""Client rate limits: each client key's `rpm` and `tpm`, checked before any upstream attempt."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.body import ensure_body, or_answer
from proxykit.config import ClientKey
from proxykit.context import RequestContext, ensure_context
from proxykit.errors import RateLimitExceeded
from proxykit.headers import set_response_headers
from proxykit.ratelimit import Admission, RateLimiter


@dataclass(frozen=True, slots=True)
class ClientLimits:
    rpm: int | None = None
    tpm: int | None = None

    @classmethod
    def by_client(cls, keys: tuple[ClientKey, ...]) -> dict[str, ClientLimits]:
        return {key.name: cls(key.rpm, key.tpm) for key in keys if key.rpm or key.tpm}


class RateLimitMiddleware:
    """Refuses with 429 `rate_limit_exceeded` (and `Retry-After`) a client over its `rpm` or `tpm`,
    and puts OpenAI's `x-ratelimit-*` headers on every response of a limited client. Tokens are
    reserved as an estimate (prompt bytes / 4, plus `max_tokens` when given) and settled with
    the upstream's real usage when the response ends.

        Middleware(RateLimitMiddleware, limits={"team-a": ClientLimits(rpm=600)},
                   limiter=MemoryRateLimiter(), max_body_bytes=20_000_000)
    """

    def __init__(
        self, app: ASGIApp, *, limits: Mapping[str, ClientLimits], limiter: RateLimiter, max_body_bytes: int
    ) -> None:
        self.app = app
        self.limits = dict(limits)
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = ensure_context(scope) if scope["type"] == "http" else None
        limits = self.limits.get(ctx.client) if ctx is not None else None
        if ctx is None or limits is None:
            await self.app(scope, receive, send)
            return
        admitted = await or_answer(self._admit(ctx, limits, scope, receive), scope, receive, send)
        if admitted is None:
            return
        admissions, estimate = admitted
        headers = [(name.encode(), value.encode()) for name, value in _headers(admissions).items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                set_response_headers(message, headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if limits.tpm:
                await self.limiter.settle(_bucket(ctx, "tpm"), _tokens_used(ctx, estimate) - estimate, limit=limits.tpm)

    async def _admit(
        self, ctx: RequestContext, limits: ClientLimits, scope: Scope, receive: Receive
    ) -> tuple[dict[str, Admission], int]:
        body = await ensure_body(scope, receive, self.max_body_bytes)
        estimate = _estimate(ctx, body) if limits.tpm else 0
        takes = {}
        if limits.rpm:
            takes["requests"] = (_bucket(ctx, "rpm"), 1.0, limits.rpm)
        if limits.tpm:
            takes["tokens"] = (_bucket(ctx, "tpm"), float(estimate), limits.tpm)
        # Both buckets at once, all or nothing: one round trip with Redis, nothing to give back.
        admissions = dict(zip(takes, await self.limiter.admit_all(list(takes.values())), strict=True))
        for kind, limit in (("requests", "rpm"), ("tokens", "tpm")):
            if kind in admissions and not admissions[kind].allowed:
                raise _refusal(ctx, limit, admissions)
        return admissions, estimate


def _bucket(ctx: RequestContext, limit: str) -> str:
    return f"client:{ctx.client}:{limit}"


def _estimate(ctx: RequestContext, body: bytes) -> int:
    payload = ctx.payload or {}
    for name in ("max_completion_tokens", "max_tokens"):
        if isinstance(payload.get(name), int) and payload[name] > 0:
            return len(body) // 4 + int(payload[name])
    return len(body) // 4 + 1


def _tokens_used(ctx: RequestContext, estimate: int) -> int:
    usage = ctx.usage
    if usage:
        total = usage.get("total_tokens")
        if isinstance(total, int):
            return total
        return sum(value for key in ("prompt_tokens", "completion_tokens") if isinstance(value := usage.get(key), int))
    if ctx.disconnected and ctx.sent_events:
        return len(ctx.body or b"") // 4 + ctx.sent_events  # what the abandoned stream used
    if ctx.outcome != "ok":
        return 0  # no upstream answer worth tokens
    return estimate  # an upstream that reports no usage: keep the reservation


def _refusal(ctx: RequestContext, limit: str, admissions: dict[str, Admission]) -> RateLimitExceeded:
    ctx.rate_limited = limit
    refused = admissions["requests" if limit == "rpm" else "tokens"]
    wait = max(1, math.ceil(refused.retry_after))
    message = (
        f"rate limit reached for {ctx.client}: {refused.limit} {'requests' if limit == 'rpm' else 'tokens'} "
        f"per minute; retry in {wait} s"
    )
    return RateLimitExceeded(message, headers={"retry-after": str(wait), **_headers(admissions)})


def _headers(admissions: dict[str, Admission]) -> dict[str, str]:
    headers = {}
    for kind, admission in admissions.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(admission.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(admission.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = f"{admission.reset:.3f}".rstrip("0").rstrip(".") + "s"
    return headers
