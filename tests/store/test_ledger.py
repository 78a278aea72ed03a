"""The ledger: batched writes off the request path, a bounded buffer, rows kept while the store is
down, the last flush at shutdown; and the budgets' spend book and periods."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import pytest

from proxykit.config.model import Budget
from proxykit.store.base import UsageRow, period_bounds
from proxykit.store.budgets import SpendBook
from proxykit.store.ledger import WRITER_NICENESS, Ledger
from proxykit.store.sql import PIECE, SqlStore, StoreUnavailable
from tests.store.conftest import row

pytestmark = pytest.mark.anyio


class FlakyStore(SqlStore):
    """A real SQLite store that refuses writes while `down`."""

    down = False

    def write(self, rows: Sequence[UsageRow], *, pause: Callable[[], None] | None = None) -> None:
        if self.down:
            raise StoreUnavailable("the store at test failed: down")
        super().write(rows, pause=pause)


def counting() -> tuple[dict[str, int], object]:
    counts: dict[str, int] = {}

    def count(result: str, amount: int) -> None:
        counts[result] = counts.get(result, 0) + amount

    return counts, count


async def test_rows_wait_in_the_buffer_until_a_flush_writes_them(tmp_path: Path) -> None:
    counts, count = counting()
    ledger = Ledger(SqlStore(f"sqlite:///{tmp_path / 'u.db'}"), count=count)  # type: ignore[arg-type]
    for i in range(7):
        ledger.record(row(request_id=f"r{i}"))
    assert ledger.buffered == 7
    rows = await ledger.read(lambda store: store.rows(limit=100))  # a read flushes first
    assert len(rows) == 7 and ledger.buffered == 0 and counts == {"written": 7}
    await ledger.aclose()


class NicenessStore(SqlStore):
    """A real SQLite store that notes the niceness of the thread each write runs in."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.niceness: list[int] = []

    def write(self, rows: Sequence[UsageRow], *, pause: Callable[[], None] | None = None) -> None:
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        super().write(rows, pause=pause)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
async def test_the_store_thread_runs_at_a_lower_priority_than_the_event_loop(tmp_path: Path) -> None:
    # A batch write on the loop's core takes the core's idle time, not its requests'.
    loop_niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    store = NicenessStore(f"sqlite:///{tmp_path / 'u.db'}")
    ledger = Ledger(store)
    ledger.record(row(request_id="r1"))
    await ledger.flush()
    ledger.record(row(request_id="r2"))
    await ledger.aclose()
    assert store.niceness == [min(19, loop_niceness + WRITER_NICENESS)] * 2
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_niceness  # the loop's is its own


class PauseCountingStore(SqlStore):
    """A real SQLite store that counts the pauses the ledger's writes make between pieces."""

    pauses = 0

    def write(self, rows: Sequence[UsageRow], *, pause: Callable[[], None] | None = None) -> None:
        assert pause is not None, "the ledger writes without pausing"

        def counted() -> None:
            self.pauses += 1
            pause()

        super().write(rows, pause=counted)


async def test_a_batch_is_written_a_piece_at_a_time_with_the_loop_let_run_between(tmp_path: Path) -> None:
    store = PauseCountingStore(f"sqlite:///{tmp_path / 'u.db'}")
    ledger = Ledger(store)
    for i in range(3 * PIECE + 1):
        ledger.record(row(request_id=f"r{i}"))
    await ledger.flush()
    assert store.pauses == 3
    assert len(await ledger.read(lambda s: s.rows(limit=1000))) == 3 * PIECE + 1
    await ledger.aclose()


class GatedStore(SqlStore):
    """A real SQLite store whose first write waits until the test opens the gate."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.writing = threading.Event()
        self.gate = threading.Event()

    def write(self, rows: Sequence[UsageRow], *, pause: Callable[[], None] | None = None) -> None:
        self.writing.set()
        self.gate.wait(timeout=10)
        super().write(rows, pause=pause)


async def test_a_flush_writes_what_was_buffered_when_it_began_and_shutdown_writes_the_rest(tmp_path: Path) -> None:
    # Under load, a flush that also took the rows arriving while it wrote would never end.
    store = GatedStore(f"sqlite:///{tmp_path / 'u.db'}")
    ledger = Ledger(store)
    for i in range(3):
        ledger.record(row(request_id=f"before-{i}"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(ledger.flush)
        with anyio.fail_after(5):
            while not store.writing.is_set():
                await anyio.sleep(0.01)
        for i in range(2):
            ledger.record(row(request_id=f"during-{i}"))
        store.gate.set()
    assert ledger.buffered == 2  # the flush ended without them
    assert {r.request_id for r in await ledger.query(lambda s: s.rows(limit=10))} == {f"before-{i}" for i in range(3)}
    await ledger.aclose()
    written = await asyncio.get_running_loop().run_in_executor(None, lambda: SqlStore(store.url).rows(limit=10))
    assert {r.request_id for r in written} == {*(f"before-{i}" for i in range(3)), "during-0", "during-1"}


async def test_a_full_buffer_drops_and_counts_and_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    counts, count = counting()
    ledger = Ledger(SqlStore(f"sqlite:///{tmp_path / 'u.db'}"), capacity=3, count=count)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="proxykit.store.ledger"):
        for i in range(10):
            ledger.record(row(request_id=f"r{i}"))
    assert ledger.buffered == 3 and counts == {"dropped": 7}
    assert len([r for r in caplog.records if "buffer full" in r.message]) == 1
    await ledger.aclose()
    assert counts == {"dropped": 7, "written": 3}


async def test_rows_survive_a_store_outage_and_arrive_after_it(tmp_path: Path) -> None:
    store = FlakyStore(f"sqlite:///{tmp_path / 'u.db'}")
    ledger = Ledger(store)
    store.down = True
    ledger.record(row(request_id="during"))
    await ledger.flush()
    assert ledger.buffered == 1 and not ledger.healthy
    assert ledger.last_error is not None and "down" in ledger.last_error
    ledger.record(row(request_id="after"))
    store.down = False
    await ledger.flush()
    assert ledger.healthy and ledger.buffered == 0
    assert {r.request_id for r in await ledger.read(lambda s: s.rows(limit=10))} == {"during", "after"}
    await ledger.aclose()


async def test_shutdown_writes_what_is_buffered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    ledger = Ledger(SqlStore(url))
    await ledger.start()
    for i in range(5):
        ledger.record(row(request_id=f"r{i}"))
    await ledger.aclose()
    assert len(SqlStore(url).rows(limit=10)) == 5


async def test_spend_counts_pending_written_and_dropped_rows_once_refreshed(tmp_path: Path) -> None:
    book = SpendBook({"team-a": Budget(max_usd=2.0, period="day")})
    ledger = Ledger(SqlStore(f"sqlite:///{tmp_path / 'u.db'}"), spend=book, capacity=2)
    now = row().time
    ledger.record(row(cost_usd=0.5))
    ledger.record(row(cost_usd=0.25, client="team-b"))  # no budget: not in the book
    ledger.record(row(cost_usd=0.75))  # dropped: the buffer holds 2
    assert book.spent("team-a", now) == pytest.approx(1.25)
    await ledger.flush()
    assert book.spent("team-a", now) == pytest.approx(1.25)
    await ledger.refresh_spend()
    assert book.spent("team-a", now) == pytest.approx(1.25)  # 0.5 from the store, 0.75 dropped here
    assert book.remaining("team-a", now) == pytest.approx(0.75)
    assert book.remaining("team-b", now) is None
    tomorrow = now + 86400
    assert book.spent("team-a", tomorrow) == pytest.approx(0.0)  # a new period starts from nothing stored
    await ledger.aclose()


@pytest.mark.parametrize(("period", "now", "start", "end"), [
    pytest.param("day", "2026-03-04T15:00", "2026-03-04T00:00", "2026-03-05T00:00", id="day"),
    pytest.param("week", "2026-03-04T15:00", "2026-03-02T00:00", "2026-03-09T00:00", id="week-from-monday"),
    pytest.param("month", "2026-12-31T23:59", "2026-12-01T00:00", "2027-01-01T00:00", id="month-into-next-year"),
    pytest.param("month", "2028-02-29T12:00", "2028-02-01T00:00", "2028-03-01T00:00", id="leap-february"),
])
def test_periods_are_utc_calendar_periods(period: str, now: str, start: str, end: str) -> None:
    def epoch(text: str) -> float:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()

    assert period_bounds(period, epoch(now)) == (epoch(start), epoch(end))
    assert period_bounds("total", epoch(now)) == (0.0, None)
