"""The ledger: finished requests go into a bounded buffer at once, and a background task writes
them to the store in batches, one transaction at least every second, in the store's own thread.
A slow or dead store never delays a request: what does not fit the buffer is dropped and
counted, and logged at most once a minute. A batch goes to the store a few dozen rows at a time,
with a pause between them, and on Linux the store's thread runs at a lower CPU priority than the
event loop: a write that shares the loop's core takes its idle time rather than its requests'.

    ledger = Ledger(SqlStore(url), spend=SpendBook(budgets))
    await ledger.start(); ledger.record(row); ...; await ledger.aclose()   # the last flush
    rows = await ledger.read(lambda store: store.rows(limit=10))
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from proxykit.store.base import UsageRow
from proxykit.store.budgets import SpendBook
from proxykit.store.sql import SqlStore, StoreUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

CAPACITY: Final = 100_000  # rows waiting for the store; about 40 MB at most
BATCH: Final = 5_000  # rows a transaction
FLUSH_EVERY: Final = 1.0  # seconds
SYNC_EVERY: Final = 1.0  # seconds between budget refreshes: other replicas' spend arrives within 2 s
PRUNE_EVERY: Final = 3600.0
LOG_EVERY: Final = 60.0
READ_TIMEOUT: Final = 30.0
# The store thread's niceness above the process's: at 10 the kernel gives it about a tenth of a
# core the event loop keeps busy, several times what writing a core's worth of rows needs, so
# it keeps up under full load while a batch no longer halves the loop's share for its duration.
WRITER_NICENESS: Final = 10


def _let_the_loop_run() -> None:
    """`SqlStore.write`'s pause between two pieces of a batch. It runs in the store's thread only,
    never on the event loop: a zero sleep there lets go of the interpreter lock and of the core,
    so the event loop's thread, waiting for either, runs now. Without it the loop waits on a
    writing thread a scheduler tick at a time."""
    time.sleep(0)  # the store's thread: see above


def _lower_this_threads_priority() -> None:
    """Linux schedules each thread on its own, so its niceness is the thread's. Elsewhere it would
    be the whole process's, so elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):  # a sandbox that forbids it: the thread runs as it is
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + WRITER_NICENESS)


class Ledger:
    def __init__(
        self, store: SqlStore, *, spend: SpendBook | None = None, capacity: int = CAPACITY,
        count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.spend = spend
        self.capacity = capacity
        self._count = count or (lambda result, amount: None)
        self._buffer: deque[UsageRow] = deque()
        self._unwritten: list[UsageRow] = []  # a batch the store refused, sent again first
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="proxykit-store", initializer=_lower_this_threads_priority)
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._dropped_since_log = 0
        self._logged: dict[str, float] = {}
        self.healthy = True  # the last write or read reached the store
        self.last_error: str | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer) + len(self._unwritten)

    def record(self, row: UsageRow) -> None:
        """Takes a finished request's row; never waits."""
        if self.buffered >= self.capacity:
            self._count("dropped", 1)
            self._dropped_since_log += 1
            if self.spend is not None:
                self.spend.dropped(row)
            if self._once_a_minute("dropped"):
                logger.error("usage store buffer full (%d rows): %d rows dropped; the store is %s",
                             self.capacity, self._dropped_since_log, self.last_error or "slow")
                self._dropped_since_log = 0
            return
        self._buffer.append(row)
        if self.spend is not None:
            self.spend.recorded(row)

    async def start(self) -> None:
        """Opens the store (creating or migrating its schema) and starts the writer. A store that
        cannot be reached now is logged; rows wait for it."""
        try:
            await self._in_thread(self.store.check)
            if self.spend is not None and self.spend.budgets:
                await self.refresh_spend()  # budgets start from the store's spend, not from zero
        except StoreUnavailable as exc:
            self._failed(exc)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self, *, to_the_end: bool = False) -> None:
        """Writes the rows buffered when it starts (each second's flush, a read that must see
        them); `to_the_end`: and those that arrive meanwhile (shutdown). Under load a flush that
        chased new rows would never end, and the writer thread would contend for the interpreter
        lock with the event loop all the time instead of once a second."""
        async with self._flush_lock:
            due = len(self._buffer)
            while self._unwritten or (self._buffer and (due > 0 or to_the_end)):
                if self._unwritten:
                    batch, self._unwritten = self._unwritten, []
                else:
                    batch = self._take_batch(len(self._buffer) if to_the_end else due)
                    due -= len(batch)
                try:
                    await self._in_thread(functools.partial(self.store.write, batch, pause=_let_the_loop_run))
                except StoreUnavailable as exc:
                    self._unwritten = batch
                    self._failed(exc)
                    return
                self._succeeded()
                self._count("written", len(batch))
                if self.spend is not None:
                    self.spend.written(batch)

    def _take_batch(self, limit: int) -> list[UsageRow]:
        """Up to `limit` (and BATCH) of the oldest rows."""
        buffer = self._buffer
        count = min(limit, BATCH, len(buffer))
        if count == len(buffer):  # the usual case: all of it, at C speed (this runs on the event loop)
            batch = list(buffer)
            buffer.clear()
            return batch
        return [buffer.popleft() for _ in range(count)]

    async def refresh_spend(self) -> None:
        assert self.spend is not None
        starts = self.spend.period_starts(time.time())
        taken = self.spend.begin_refresh()
        try:
            spent = await self._in_thread(self.store.spend_since, starts)
        except StoreUnavailable:
            self.spend.refresh_failed(taken)
            raise
        self.spend.refreshed(spent, starts)

    async def read(self, query: Callable[[SqlStore], T]) -> T:
        """Runs `query(store)` in the store's thread, after this process's rows are written."""
        with contextlib.suppress(StoreUnavailable):
            await asyncio.wait_for(self.flush(), READ_TIMEOUT)
        try:
            result = await asyncio.wait_for(self._in_thread(query, self.store), READ_TIMEOUT)
        except TimeoutError:
            raise StoreUnavailable("the store did not answer in time") from None
        except StoreUnavailable as exc:
            self._failed(exc)
            raise
        return result

    async def query(self, query: Callable[[SqlStore], T], timeout: float = READ_TIMEOUT) -> T:
        """Runs `query(store)` in the store's thread, without writing buffered rows first."""
        try:
            return await asyncio.wait_for(self._in_thread(query, self.store), timeout)
        except TimeoutError:
            raise StoreUnavailable("the store did not answer in time") from None

    async def probe(self, timeout: float = 2.0) -> bool:
        """Whether the store answers now (health checks); a failure is logged like a write's."""
        try:
            await asyncio.wait_for(self._in_thread(self.store.check), timeout)
        except TimeoutError:
            self._failed(StoreUnavailable("the store did not answer in time"))
        except StoreUnavailable as exc:
            self._failed(exc)
        else:
            self._succeeded()
        return self.healthy

    async def aclose(self, timeout: float = 10.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(to_the_end=True), timeout)
        except TimeoutError:
            logger.error("usage store: %d rows not written at shutdown (the store did not answer)", self.buffered)
        if self.buffered:
            self._count("dropped", self.buffered)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        next_prune = time.monotonic()
        next_sync = time.monotonic() + SYNC_EVERY
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()
            now = time.monotonic()
            if self.spend is not None and self.spend.budgets and now >= next_sync:
                next_sync = now + SYNC_EVERY
                with contextlib.suppress(StoreUnavailable):
                    await self.refresh_spend()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY
                await self._prune()

    async def _prune(self) -> None:
        before = time.time() - self.store.retention_days * 86400
        try:
            removed = await self._in_thread(self.store.prune, before)
        except StoreUnavailable as exc:
            self._failed(exc)
            return
        if removed:
            logger.info("usage store: %d request rows older than %d days removed", removed,
                        self.store.retention_days)

    async def _in_thread(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _failed(self, exc: StoreUnavailable) -> None:
        self.healthy, self.last_error = False, str(exc)
        if self._once_a_minute("failed"):
            logger.error("usage store unavailable (%d rows waiting): %s", self.buffered, exc)

    def _succeeded(self) -> None:
        if not self.healthy:
            logger.warning("usage store reachable again")
        self.healthy, self.last_error = True, None

    def _once_a_minute(self, what: str) -> bool:
        now = time.monotonic()
        if now - self._logged.get(what, -LOG_EVERY) < LOG_EVERY:
            return False
        self._logged[what] = now
        return True
