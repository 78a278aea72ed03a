"""Prometheus metrics for every request: counts, latencies, tokens, cost, attempts and retries."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.config import Pricing
from proxykit.context import RequestContext, ensure_context
from proxykit.metrics import Change, Observation, ProxyMetrics
from proxykit.sends import step_aside
from proxykit.settle import settle

logger = logging.getLogger(__name__)


class MetricsMiddleware:
    """Records each request once it has ended. Labels stay bounded: `model` is a configured name
    or `unknown`, `client` a configured key name or `anonymous`, `key` an alias.

        Middleware(MetricsMiddleware, metrics=ProxyMetrics(registry, pool), pricing={"gpt-x": Pricing(...)})
    """

    def __init__(self, app: ASGIApp, *, metrics: ProxyMetrics, pricing: Mapping[str, Pricing] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.pricing = dict(pricing or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = ensure_context(scope)
        metrics = self.metrics
        counted_as = ctx.model
        metrics.add(metrics.in_flight, (counted_as,))
        metrics.loop_lag.enter()

        def moved_to(model: str) -> None:  # the model is known only once an inner layer read the body
            nonlocal counted_as
            metrics.record(((metrics.in_flight, (counted_as,), -1.0), (metrics.in_flight, (model,), 1.0)), ())
            counted_as = model

        ctx.on_model = moved_to
        observed = _ObservedSend(send)
        try:
            await self.app(scope, receive, observed)
        finally:
            metrics.loop_lag.leave()
            status = 499 if ctx.disconnected else observed.status
            try:
                self._record(ctx, counted_as, status, observed.first_byte_at)
            except Exception:  # a bug: the request still leaves the in-flight gauge
                logger.exception("request %s could not be counted", ctx.request_id)
                metrics.add(metrics.in_flight, (counted_as,), -1.0)

    def _record(self, ctx: RequestContext, counted_as: str, status: int, first_byte_at: float | None) -> None:
        metrics, model, client = self.metrics, ctx.model, ctx.client
        duration = time.perf_counter() - ctx.started
        counts: list[Change] = [
            (metrics.in_flight, (counted_as,), -1.0),
            (metrics.requests, (model, client, str(status)), 1.0),
        ]
        observations: list[Observation] = [
            (metrics.duration, (model,), duration),
            (metrics.overhead, (model,), max(0.0, duration - ctx.upstream_wait - ctx.backoff_wait)),
        ]
        if first_byte_at is not None:
            observations.append((metrics.ttfb, (model,), first_byte_at - ctx.started))
        if ctx.rate_limited:
            counts.append((metrics.rate_limited, (client, ctx.rate_limited), 1.0))
        if ctx.budget_refused:
            counts.append((metrics.budget_rejected, (client,), 1.0))
        previous = None
        for deployment, alias, outcome in ctx.attempts or ():
            counts.append((metrics.attempts, (model, deployment, alias, outcome), 1.0))
            if previous is not None:
                counts.append((metrics.retries, (model, previous), 1.0))
            previous = outcome
        if ctx.cache is not None:
            counts.append((metrics.cache_requests, (model, ctx.cache), 1.0))
            if ctx.cache_saved_tokens:
                counts.append((metrics.cache_saved_tokens, (model,), float(ctx.cache_saved_tokens)))
        self._count_tokens(ctx, counts)
        metrics.record(counts, observations)

    def _count_tokens(self, ctx: RequestContext, counts: list[Change]) -> None:
        if ctx.cache == "hit":  # nothing reached an upstream: no tokens used, no cost
            return
        tokens, cost = settle(ctx, self.pricing)
        metrics, model, client = self.metrics, ctx.model, ctx.client
        for kind, count in (("prompt", tokens.prompt), ("completion", tokens.completion),
                            ("reasoning", tokens.reasoning)):
            if count:
                counts.append((metrics.tokens, (model, client, kind), float(count)))
        if self.pricing.get(ctx.served_by or model) is not None:
            counts.append((metrics.cost, (model, client), cost))


class _ObservedSend:
    """The metrics layer's `send`: notes the status and when the first body byte left. An object
    rather than a closure, because a closure that steps itself aside refers to itself, and that
    cycle would leave every request's objects to the garbage collector."""

    __slots__ = ("first_byte_at", "proxykit_passes_to", "send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 500  # what an exception that escapes below would become
        self.first_byte_at: float | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif self.first_byte_at is None and message.get("body"):
            self.first_byte_at = time.perf_counter()
            step_aside(self, self.send)  # the rest of the body is no news
        await self.send(message)
