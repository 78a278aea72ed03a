"""Token counts and cost: the one place that turns an upstream's usage (or, without one, an
estimate) into numbers, for metrics, limits and (next) the store.

    tokens = counts(ctx.usage)                # TokenCounts(prompt=..., completion=..., ...)
    cost_usd(tokens, model.pricing)
    prompt_estimate(body)                     # ~4 bytes a token
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from proxykit.config import Pricing

# No request uses more; a larger count comes from a broken or hostile upstream (or client), and
# would overflow the float arithmetic of limits and metrics.
MAX_TOKENS: Final = 10**12


class TokenCounts(NamedTuple):  # a tuple: made on every request, cheaper than a frozen dataclass
    prompt: int = 0
    completion: int = 0  # reasoning tokens included, as upstreams report them
    reasoning: int = 0
    reported_total: int = 0  # the upstream's own total_tokens, when it gave one

    @property
    def total(self) -> int:
        return self.reported_total or self.prompt + self.completion


def token_count(value: object) -> int:
    """A count as reported: an int from 1 to `MAX_TOKENS`; anything else counts 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_TOKENS:
        return value
    return 0


def counts(usage: Mapping[str, Any] | None) -> TokenCounts:
    """The counts of an OpenAI-style `usage` object (Chat Completions names; the usage reader maps
    the Responses API's and Anthropic's to them)."""
    if not usage:
        return TokenCounts()
    details = usage.get("completion_tokens_details")
    return TokenCounts(
        prompt=token_count(usage.get("prompt_tokens")),
        completion=token_count(usage.get("completion_tokens")),
        reasoning=token_count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0,
        reported_total=token_count(usage.get("total_tokens")),
    )


def prompt_estimate(body: bytes) -> int:
    """The prompt's tokens before the upstream says: ~4 bytes a token, as OpenAI's rule of thumb."""
    return len(body) // 4


def abandoned_stream(body: bytes, sent_events: int) -> TokenCounts:
    """A stream the client left never got its usage event: the prompt by its estimate, and one
    completion token for each event that was sent."""
    return TokenCounts(prompt=prompt_estimate(body), completion=sent_events)


def cost_usd(tokens: TokenCounts, pricing: Pricing | None) -> float:
    if pricing is None:
        return 0.0
    return tokens.prompt * pricing.input_per_1m / 1e6 + tokens.completion * pricing.output_per_1m / 1e6
