"""What each budgeted client has spent in its current period: the store's totals, refreshed every
second, plus what this process recorded since and has not seen come back from the store.

    book = SpendBook({"team-a": Budget(max_usd=100, period="month")})
    book.remaining("team-a", time.time())     # None: no budget; else USD left, never below 0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxykit.config.model import Budget
from proxykit.store.base import UsageRow, period_bounds


@dataclass(slots=True)
class _Spend:
    stored: float = 0.0  # the store's total at the last refresh
    stored_start: float = -1.0  # the period start that total belongs to
    pending: float = 0.0  # recorded here, not yet written
    since_refresh: float = 0.0  # written here after the last refresh began (it may count twice: safe)
    lost: float = 0.0  # recorded here, dropped before the store took it
    lost_start: float = -1.0


class SpendBook:
    """Budgets' spend. A row may count twice for up to a second, never zero times: a budget
    errs toward refusing early, not spending over."""

    def __init__(self, budgets: Mapping[str, Budget]) -> None:
        self.budgets = dict(budgets)
        self._spend = {client: _Spend() for client in self.budgets}

    def update(self, budgets: Mapping[str, Budget]) -> None:
        """New budgets (a reload): clients that keep one keep their spend."""
        self.budgets = dict(budgets)
        self._spend = {client: self._spend.get(client) or _Spend() for client in self.budgets}

    def spent(self, client: str, now: float) -> float:
        spend = self._spend[client]
        start, _ = period_bounds(self.budgets[client].period, now)
        stored = spend.stored if spend.stored_start == start else 0.0
        lost = spend.lost if spend.lost_start == start else 0.0
        return stored + spend.pending + spend.since_refresh + lost

    def remaining(self, client: str, now: float) -> float | None:
        budget = self.budgets.get(client)
        if budget is None:
            return None
        return max(0.0, budget.max_usd - self.spent(client, now))

    def recorded(self, row: UsageRow) -> None:
        spend = self._spend.get(row.client)
        if spend is not None:
            spend.pending += row.cost_usd

    def written(self, rows: Iterable[UsageRow]) -> None:
        if not self._spend:  # no budgets: nothing to follow, and no loop over a second's rows
            return
        for row in rows:
            spend = self._spend.get(row.client)
            if spend is not None:
                spend.pending -= row.cost_usd
                spend.since_refresh += row.cost_usd

    def dropped(self, row: UsageRow) -> None:
        spend = self._spend.get(row.client)
        if spend is not None:
            start, _ = period_bounds(self.budgets[row.client].period, row.time)
            if spend.lost_start != start:
                spend.lost, spend.lost_start = 0.0, start
            spend.lost += row.cost_usd

    def period_starts(self, now: float) -> dict[str, float]:
        """Each budgeted client's current period start: what a refresh asks the store for."""
        return {client: period_bounds(budget.period, now)[0] for client, budget in self.budgets.items()}

    def begin_refresh(self) -> dict[str, float]:
        """Called as the store's query is sent; returns what to give back if it fails."""
        taken = {client: spend.since_refresh for client, spend in self._spend.items()}
        for spend in self._spend.values():
            spend.since_refresh = 0.0
        return taken

    def refreshed(self, spent: Mapping[str, float], starts: Mapping[str, float]) -> None:
        for client, total in spent.items():
            spend = self._spend[client]
            spend.stored, spend.stored_start = total, starts[client]

    def refresh_failed(self, taken: Mapping[str, float]) -> None:
        for client, amount in taken.items():
            self._spend[client].since_refresh += amount
