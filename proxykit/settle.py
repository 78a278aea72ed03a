"""A finished request's tokens and cost, worked out once for the metrics and the store.

    tokens, cost = settle(ctx, pricing)
"""

from __future__ import annotations

from collections.abc import Mapping

from proxykit.config import Pricing
from proxykit.context import RequestContext
from proxykit.usage import accounting
from proxykit.usage.accounting import TokenCounts

_NOTHING = (TokenCounts(), 0.0)


def settle(ctx: RequestContext, pricing: Mapping[str, Pricing]) -> tuple[TokenCounts, float]:
    """The upstream's usage (or, for a stream its client left, the estimate) priced by the model
    entry that answered. A cache hit holds its stored answer's tokens and costs nothing."""
    if ctx.settled is not None:
        return ctx.settled
    if ctx.cache == "hit":
        settled = (ctx.cache_hit_tokens or TokenCounts(), 0.0)
    elif ctx.usage is not None:
        tokens = ctx.usage_counts()
        settled = (tokens, accounting.cost_usd(tokens, pricing.get(ctx.served_by or ctx.model)))
    elif ctx.disconnected and ctx.sent_events:
        tokens = accounting.abandoned_stream(ctx.body or b"", ctx.sent_events)
        settled = (tokens, accounting.cost_usd(tokens, pricing.get(ctx.served_by or ctx.model)))
    else:
        settled = _NOTHING
    ctx.settled = settled
    return settled
