"""The usage store's layer: one row for every finished LLM request, refused ones included."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit.config import Pricing
from proxykit.context import RequestContext, ensure_context
from proxykit.settle import settle
from proxykit.store.base import UsageRow
from proxykit.store.ledger import Ledger
from proxykit.usage.accounting import token_count

logger = logging.getLogger(__name__)

_MAX_TEXT = 200  # a client's model name or path is cut to this in a row


class LedgerMiddleware:
    """Hands a row to the ledger when a request `recorded(scope)` selects has ended. Never waits:
    the ledger writes in the background.

        Middleware(LedgerMiddleware, ledger=ledger, pricing={"gpt-x": Pricing(...)}, recorded=is_llm_request)
    """

    def __init__(
        self, app: ASGIApp, *, ledger: Ledger, pricing: Mapping[str, Pricing] | None = None,
        recorded: Callable[[Scope], bool] = lambda scope: True,
    ) -> None:
        self.app = app
        self.ledger = ledger
        self.pricing = dict(pricing or {})
        self.recorded = recorded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.recorded(scope):
            await self.app(scope, receive, send)
            return
        ctx = ensure_context(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            try:
                self.ledger.record(self._row(scope, ctx))
            except Exception:  # a bug: the request itself is done and must not fail for it
                logger.exception("request %s could not be recorded", ctx.request_id)

    def _row(self, scope: Scope, ctx: RequestContext) -> UsageRow:
        duration = time.perf_counter() - ctx.started
        tokens, cost = settle(ctx, self.pricing)
        payload = ctx.payload or {}
        asked = payload.get("model")
        return UsageRow(
            time=time.time() - duration,
            request_id=ctx.request_id,
            client=ctx.client,
            model=asked[:_MAX_TEXT] if isinstance(asked, str) else ctx.model,
            served_model=ctx.served_by,
            deployment=ctx.deployment,
            key=ctx.key_alias,
            path=scope["path"][:_MAX_TEXT],
            status=499 if ctx.disconnected else (ctx.status or 500),
            stream=payload.get("stream") is True,
            prompt_tokens=tokens.prompt,
            completion_tokens=tokens.completion,
            reasoning_tokens=tokens.reasoning,
            cached_tokens=_cached_tokens(ctx.usage),
            cost_usd=cost,
            duration_ms=round(duration * 1000, 3),
            ttfb_ms=None if ctx.ttfb is None else round(ctx.ttfb * 1000, 3),
            attempts=len(ctx.attempts or ()),
            cache=ctx.cache,
            totals_model=ctx.model,
        )


def _cached_tokens(usage: Mapping[str, Any] | None) -> int:
    """The provider's own prompt-cache count: OpenAI's `prompt_tokens_details.cached_tokens`."""
    details = (usage or {}).get("prompt_tokens_details")
    return token_count(details.get("cached_tokens")) if isinstance(details, dict) else 0  # parsed JSON
