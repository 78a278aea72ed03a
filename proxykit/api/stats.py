"""The store's answers in the management API's shapes (CONTRACT section 9): usage totals,
performance over recent requests, budgets. Pure functions of what the store returned."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from typing import Any, Final

from proxykit.errors import InvalidRequest
from proxykit.store.base import iso_time, period_bounds
from proxykit.store.budgets import SpendBook

PERFORMANCE_SAMPLE: Final = 200_000  # the newest requests of the window that performance reads


def date_range(start: str | None, end: str | None, today: dt.date) -> tuple[dt.date, dt.date]:
    """Inclusive UTC days; by default the last 30 (today and the 29 before)."""
    last = _date(end, "end_date") if end else today
    try:
        first = _date(start, "start_date") if start else last - dt.timedelta(days=29)
    except OverflowError:
        raise InvalidRequest("end_date is too early for a default start_date") from None
    if first > last:
        raise InvalidRequest("start_date must not be after end_date")
    return first, last


def epoch(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def usage_answer(first: dt.date, last: dt.date, totals: Iterable[tuple[str, str, int, int, float]]) -> dict[str, Any]:
    by_model: dict[str, dict[str, Any]] = {}
    by_client: dict[str, dict[str, Any]] = {}
    for model, client, requests, tokens, cost in totals:
        for table, name in ((by_model, model), (by_client, client)):
            entry = table.setdefault(name, {"requests": 0, "tokens": 0, "cost": 0.0})
            entry["requests"] += requests
            entry["tokens"] += tokens
            entry["cost"] += cost
    for table in (by_model, by_client):
        for entry in table.values():
            entry["cost"] = round(entry["cost"], 10)
    return {
        "period": {"start": first.isoformat(), "end": last.isoformat()},
        "total_requests": sum(entry["requests"] for entry in by_model.values()),
        "total_tokens": sum(entry["tokens"] for entry in by_model.values()),
        "total_cost": round(sum(entry["cost"] for entry in by_model.values()), 10),
        "by_model": by_model,
        "by_client": by_client,
    }


def performance_answer(minutes: int, sample: Sequence[tuple[str, float, float | None, int, int]]) -> dict[str, Any]:
    answer = _performance(minutes, sample)
    models: dict[str, list[tuple[str, float, float | None, int, int]]] = {}
    for row in sample:
        models.setdefault(row[0], []).append(row)
    answer["by_model"] = {model: _performance(minutes, rows) for model, rows in models.items()}
    answer["minutes"] = minutes
    return answer


def _performance(minutes: int, rows: Sequence[tuple[str, float, float | None, int, int]]) -> dict[str, Any]:
    durations = sorted(row[1] for row in rows)
    ttfbs = sorted(row[2] for row in rows if row[2] is not None)
    succeeded = sum(1 for row in rows if row[3] < 400)
    success = succeeded / len(rows) if rows else None
    return {
        "requests": len(rows),
        "response_times": _distribution(durations),
        "time_to_first_byte": _distribution(ttfbs),
        "success_rate": None if success is None else round(success, 4),
        "error_rate": None if success is None else round(1 - success, 4),
        "throughput": {
            "requests_per_minute": round(len(rows) / minutes, 3),
            "tokens_per_minute": round(sum(row[4] for row in rows) / minutes, 3),
        },
    }


def _distribution(ordered: Sequence[float]) -> dict[str, float | None]:
    if not ordered:
        return {"average_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None}

    def rank(q: float) -> float:  # nearest rank
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 1)

    return {"average_ms": round(sum(ordered) / len(ordered), 1), "p50_ms": rank(0.50), "p95_ms": rank(0.95),
            "p99_ms": rank(0.99)}


def budgets_answer(book: SpendBook, clients: Iterable[str], now: float) -> dict[str, Any]:
    budgets: dict[str, Any] = {}
    for client in clients:
        budget = book.budgets.get(client)
        if budget is None:
            continue
        spent = book.spent(client, now)
        _, end = period_bounds(budget.period, now)
        budgets[client] = {
            "max_usd": budget.max_usd, "spent_usd": round(spent, 10),
            "remaining_usd": round(max(0.0, budget.max_usd - spent), 10), "period": budget.period,
            "resets_at": None if end is None else iso_time(end),
        }
    return {"budgets": budgets}


def since_time(value: str | None) -> float | None:
    """`since` as ISO 8601 (UTC unless it says) or epoch seconds."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("since must be ISO 8601 or epoch seconds") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def _date(value: str, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date as YYYY-MM-DD") from None
