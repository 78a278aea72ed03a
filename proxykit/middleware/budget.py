"""Client budgets: a client key that has spent its `budget` for the period is refused."""

from __future__ import annotations

import math
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit.context import ensure_context
from proxykit.errors import BudgetExceeded
from proxykit.headers import adding_headers
from proxykit.respond import send_error
from proxykit.store.base import period_bounds
from proxykit.store.budgets import SpendBook

REMAINING_HEADER = b"x-proxykit-budget-remaining-usd"


class BudgetMiddleware:
    """Refuses with 429 `budget_exceeded` (type `insufficient_quota`, `Retry-After` until the
    period ends) a client whose spend reached its budget, and tells every other response of a
    budgeted client what was left at admission. A request admitted is never cut off: the worst
    overshoot is what the requests in flight cost (README: Budgets).

        Middleware(BudgetMiddleware, spend=SpendBook({"team-a": Budget(max_usd=100)}))
    """

    def __init__(self, app: ASGIApp, *, spend: SpendBook) -> None:
        self.app = app
        self.spend = spend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = ensure_context(scope)
        now = time.time()
        remaining = self.spend.remaining(ctx.client, now)
        if remaining is None:  # no budget for this client
            await self.app(scope, receive, send)
            return
        header = [(REMAINING_HEADER, b"%.6f" % remaining)]
        if remaining <= 0:
            budget = self.spend.budgets[ctx.client]
            _, end = period_bounds(budget.period, now)
            retry = {} if end is None else {"Retry-After": str(max(1, math.ceil(end - now)))}
            ctx.budget_refused = True
            message = (f"client {ctx.client!r} has spent its budget of {budget.max_usd:g} USD for this "
                       f"{budget.period if budget.period != 'total' else 'key'}")
            await send_error(BudgetExceeded(message, headers=retry), scope, receive, adding_headers(send, header))
            return
        await self.app(scope, receive, adding_headers(send, header))
