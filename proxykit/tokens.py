"""Token counts: what an upstream reports, and what proxykit estimates before it knows.

    token_count(usage.get("prompt_tokens"))   # a sane int, 0 for anything else
    prompt_estimate(body)                     # ~4 bytes a token
"""

from __future__ import annotations

from typing import Final

# No request uses more; a larger count comes from a broken or hostile upstream (or client), and
# would overflow the float arithmetic of limits and metrics.
MAX_TOKENS: Final = 10**12


def token_count(value: object) -> int:
    """A count as reported: an int from 1 to `MAX_TOKENS`; anything else counts 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_TOKENS:
        return value
    return 0


def prompt_estimate(body: bytes) -> int:
    """The prompt's tokens before the upstream says: ~4 bytes a token, as OpenAI's rule of thumb."""
    return len(body) // 4
