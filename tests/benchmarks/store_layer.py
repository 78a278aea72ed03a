"""What the usage store's layer costs the event loop a request, in process.

    python -m tests.benchmarks.store_layer [--requests 100000] [--rounds 7]

`LedgerMiddleware` around an app that answers at once, against that app alone, on one event loop:
the difference is the layer's own work (its frame, the row, handing it to the ledger's buffer).
The app settles the request's tokens and cost itself, as the metrics layer does in the proxy, so
the row reuses them there too. Nothing is written: each round has a new ledger that is never
started, so its rows are only buffered. Prints the least and the median of the rounds, in µs a
request. Pin it to one core (`taskset -c 0`).
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.context import ensure_context
from proxykit.middleware.ledger import LedgerMiddleware
from proxykit.settle import settle
from proxykit.store.budgets import SpendBook
from proxykit.store.ledger import Ledger
from proxykit.store.sql import SqlStore
from tests.benchmarks.in_process import from_command_line, report

SCOPE: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def answered(scope: Scope, receive: Receive, send: Send) -> None:
    """What the inner layers leave on a request's context when the upstream has answered."""
    ctx = ensure_context(scope)
    ctx.usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    ctx.model = ctx.served_by = ctx.deployment = "bench"
    ctx.key_alias, ctx.status, ctx.ttfb = "bench#1", 200, 0.001
    ctx.payload = {"model": "bench"}
    settle(ctx, {})


async def per_request(app: ASGIApp, requests: int) -> float:
    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    started = time.perf_counter()
    for _ in range(requests):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter() - started) / requests


async def main(requests: int, rounds: int) -> None:
    costs = []
    for _ in range(rounds):
        # A new ledger a round, never started: its rows are only buffered, and only the layer is timed.
        ledger = Ledger(SqlStore("sqlite://"), spend=SpendBook({}), capacity=requests + 1)
        with_layer = await per_request(LedgerMiddleware(answered, ledger=ledger), requests)
        alone = await per_request(answered, requests)
        costs.append((with_layer - alone) * 1e6)
    report("the store's layer", costs, requests)


if __name__ == "__main__":
    from_command_line(__doc__, main, requests=100_000, rounds=7)
