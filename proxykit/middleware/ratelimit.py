"""Client rate limits: each client key's `rpm` and `tpm`, checked before any upstream attempt."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit.body import ensure_body, ensure_payload, or_answer
from proxykit.config import ClientKey, ModelConfig
from proxykit.context import RequestContext, ensure_context
from proxykit.errors import RateLimitExceeded
from proxykit.headers import adding_headers
from proxykit.limits.base import Admission, RateLimiter
from proxykit.outcomes import Outcome
from proxykit.usage.accounting import MAX_TOKENS, abandoned_stream, prompt_estimate


@dataclass(frozen=True, slots=True)
class ClientLimits:
    rpm: int | None = None
    tpm: int | None = None

    @classmethod
    def by_client(cls, keys: tuple[ClientKey, ...]) -> dict[str, ClientLimits]:
        return {key.name: cls(key.rpm, key.tpm) for key in keys if key.rpm or key.tpm}

    @classmethod
    def by_model(cls, models: tuple[ModelConfig, ...]) -> dict[str, ClientLimits]:
        """Each model's own limits, across every client (`rate_limit`); a disabled model spends
        none (it answers 503 further in)."""
        return {model.name: cls(model.rpm, model.tpm) for model in models if (model.rpm or model.tpm) and model.enabled}


@dataclass(frozen=True, slots=True)
class _Buckets:
    """One client's limits and the names of its buckets, made once rather than per request."""

    limits: ClientLimits
    requests: str
    tokens: str

    @classmethod
    def of(cls, per: str, name: str, limits: ClientLimits) -> _Buckets:
        return cls(limits, f"{per}:{name}:rpm", f"{per}:{name}:tpm")


class RateLimitMiddleware:
    """Refuses with 429 `rate_limit_exceeded` (and `Retry-After`) a client over its `rpm` or `tpm`,
    and puts OpenAI's `x-ratelimit-*` headers on every response of a limited client. Tokens are
    reserved as an estimate (prompt bytes / 4, plus `max_tokens` when given) and settled with
    the upstream's real usage when the response ends.

        Middleware(RateLimitMiddleware, limits={"team-a": ClientLimits(rpm=600)},
                   limiter=MemoryRateLimiter(), max_body_bytes=20_000_000)
    """

    def __init__(
        self, app: ASGIApp, *, limits: Mapping[str, ClientLimits], limiter: RateLimiter, max_body_bytes: int,
        per: str = "client",
    ) -> None:
        """`per="model"`: `limits` are by model name, each across every client (a model's
        `rate_limit`); refusals are counted as `model_rpm` and `model_tpm`, and only the client's
        own limits set the `x-ratelimit-*` headers."""
        self.app = app
        self.per = per
        self.buckets = {name: _Buckets.of(per, name, subject_limits) for name, subject_limits in limits.items()}
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = ensure_context(scope) if scope["type"] == "http" else None
        if ctx is None:
            await self.app(scope, receive, send)
            return
        if self.per == "client":
            buckets = self.buckets.get(ctx.client)
        elif (payload := await or_answer(ensure_payload(scope, receive, self.max_body_bytes), scope, receive,
                                          send)) is None:
            return
        else:
            buckets = self.buckets.get(str(payload.get("model")))
        if buckets is None:
            await self.app(scope, receive, send)
            return
        admitted = await or_answer(self._admit(ctx, buckets, scope, receive), scope, receive, send)
        if admitted is None:
            return
        admissions, estimate = admitted
        try:
            await self.app(scope, receive, adding_headers(send, _headers(admissions)) if self.per == "client" else send)
        finally:
            if tpm := buckets.limits.tpm:
                await self.limiter.settle(buckets.tokens, _tokens_used(ctx, estimate) - estimate, limit=tpm)

    async def _admit(
        self, ctx: RequestContext, buckets: _Buckets, scope: Scope, receive: Receive
    ) -> tuple[dict[bytes, Admission], int]:
        limits = buckets.limits
        estimate = 0
        if limits.tpm:  # the estimate reads the body's max_tokens
            await ensure_payload(scope, receive, self.max_body_bytes)
            assert ctx.body is not None
            estimate = _estimate(ctx, ctx.body)
        else:
            await ensure_body(scope, receive, self.max_body_bytes)
        kinds, takes = [], []
        if limits.rpm:
            kinds.append(b"requests")
            takes.append((buckets.requests, 1.0, limits.rpm))
        if limits.tpm:
            kinds.append(b"tokens")
            takes.append((buckets.tokens, float(estimate), limits.tpm))
        # Both buckets at once, all or nothing: one round trip with Redis, nothing to give back.
        admissions = dict(zip(kinds, await self.limiter.admit_all(takes), strict=True))
        for kind, limit in ((b"requests", "rpm"), (b"tokens", "tpm")):
            if kind in admissions and not admissions[kind].allowed:
                raise _refusal(ctx, limit if self.per == "client" else f"{self.per}_{limit}", admissions)
        return admissions, estimate


def _estimate(ctx: RequestContext, body: bytes) -> int:
    payload = ctx.payload or {}
    for name in ("max_completion_tokens", "max_tokens"):
        if isinstance(value := payload.get(name), int) and value > 0:
            return prompt_estimate(body) + min(value, MAX_TOKENS)  # 400 digits must not overflow a float
    return prompt_estimate(body) + 1


def _tokens_used(ctx: RequestContext, estimate: int) -> int:
    if ctx.usage:
        return ctx.usage_counts().total
    if ctx.disconnected and ctx.sent_events:
        return abandoned_stream(ctx.body or b"", ctx.sent_events).total  # what the abandoned stream used
    if ctx.outcome is not Outcome.OK:
        return 0  # no upstream answer worth tokens
    return estimate  # an upstream that reports no usage: keep the reservation


def _refusal(ctx: RequestContext, limit: str, admissions: dict[bytes, Admission]) -> RateLimitExceeded:
    ctx.rate_limited = limit
    requests = limit.endswith("rpm")
    refused = admissions[b"requests" if requests else b"tokens"]
    wait = max(1, math.ceil(refused.retry_after))
    whose = f"the model {ctx.model}" if limit.startswith("model_") else ctx.client
    message = (
        f"rate limit reached for {whose}: {refused.limit} {'requests' if requests else 'tokens'} "
        f"per minute; retry in {wait} s"
    )
    headers = {} if limit.startswith("model_") else \
        {name.decode(): value.decode() for name, value in _headers(admissions)}
    return RateLimitExceeded(message, headers={"retry-after": str(wait), **headers})


def _headers(admissions: dict[bytes, Admission]) -> list[tuple[bytes, bytes]]:
    """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`; resets like `6.5s`."""
    headers: list[tuple[bytes, bytes]] = []
    for kind, admission in admissions.items():
        limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
        headers += (
            (limit_name, b"%d" % admission.limit),
            (remaining_name, b"%d" % admission.remaining),
            (reset_name, (b"%.3f" % admission.reset).rstrip(b"0").rstrip(b".") + b"s"),
        )
    return headers


_HEADER_NAMES: Final = {
    kind: (b"x-ratelimit-limit-" + kind, b"x-ratelimit-remaining-" + kind, b"x-ratelimit-reset-" + kind)
    for kind in (b"requests", b"tokens")
}
