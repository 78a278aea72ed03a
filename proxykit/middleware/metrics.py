"""Prometheus metrics for every request: counts, latencies, tokens, cost, attempts and retries."""

from __future__ import annotations

import time
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.config import Pricing
from proxykit.context import RequestContext, ensure_context
from proxykit.metrics import ProxyMetrics


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
        metrics.labelled(metrics.in_flight, counted_as).inc()

        def moved_to(model: str) -> None:  # the model is known only once an inner layer read the body
            nonlocal counted_as
            metrics.labelled(metrics.in_flight, counted_as).dec()
            metrics.labelled(metrics.in_flight, model).inc()
            counted_as = model

        ctx.on_model = moved_to
        status = 500  # what an exception that escapes below would become
        first_byte_at: float | None = None

        async def send_observed(message: Message) -> None:
            nonlocal status, first_byte_at
            if message["type"] == "http.response.start":
                status = message["status"]
            elif first_byte_at is None and message.get("body"):
                first_byte_at = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            metrics.labelled(metrics.in_flight, counted_as).dec()
            self._record(ctx, 499 if ctx.disconnected else status, first_byte_at)

    def _record(self, ctx: RequestContext, status: int, first_byte_at: float | None) -> None:
        metrics, model, client = self.metrics, ctx.model, ctx.client
        duration = time.perf_counter() - ctx.started
        metrics.labelled(metrics.requests, model, client, str(status)).inc()
        metrics.labelled(metrics.duration, model).observe(duration)
        if first_byte_at is not None:
            metrics.labelled(metrics.ttfb, model).observe(first_byte_at - ctx.started)
        metrics.labelled(metrics.overhead, model).observe(max(0.0, duration - ctx.upstream_wait - ctx.backoff_wait))
        if ctx.rate_limited:
            metrics.labelled(metrics.rate_limited, client, ctx.rate_limited).inc()
        previous = None
        for deployment, alias, outcome in ctx.attempts or ():
            metrics.labelled(metrics.attempts, model, deployment, alias, outcome).inc()
            if previous is not None:
                metrics.labelled(metrics.retries, model, previous).inc()
            previous = outcome
        self._record_tokens(ctx)

    def _record_tokens(self, ctx: RequestContext) -> None:
        usage = ctx.usage
        if usage is None and ctx.disconnected and ctx.sent_events:
            # A stream the client abandoned never got its usage event: count what was sent, one
            # token an event, and the prompt at ~4 bytes a token.
            usage = {"prompt_tokens": len(ctx.body or b"") // 4, "completion_tokens": ctx.sent_events}
        if not usage:
            return
        prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        details = usage.get("completion_tokens_details")
        reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
        metrics, model, client = self.metrics, ctx.model, ctx.client
        for kind, count in (("prompt", prompt), ("completion", completion), ("reasoning", reasoning)):
            if count:
                metrics.labelled(metrics.tokens, model, client, kind).inc(count)
        pricing = self.pricing.get(ctx.served_by or model)
        if pricing is not None:
            cost = prompt * pricing.input_per_1m / 1e6 + completion * pricing.output_per_1m / 1e6
            self.metrics.labelled(metrics.cost, model, client).inc(cost)


def _count(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0
