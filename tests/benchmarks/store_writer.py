"""How long the event loop waits on the store's writer thread while it writes a batch.

    python -m tests.benchmarks.store_writer [--url postgresql://...] [--batches 15]

One process on one core (as the benchmark pins each proxy): the event loop is kept busy in steps of
50 µs, as under load, while the real ledger writes batches of 5,300 rows (a second's at ~5,300
req/s) to a real store. Between two steps the loop should wait only for itself; every gap over
0.5 ms is time it waited on the writer. Prints the time the loop lost a batch (every gap), the
long waits in it, the longest and the p99.9 of the gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from proxykit.store.base import UsageRow
from proxykit.store.ledger import Ledger
from proxykit.store.sql import SqlStore

STEP = 50e-6  # seconds of work a loop step: a request's share of the loop under load
BATCH = 5_300
HELD = 0.5e-3  # a gap longer than this is a wait


def rows(count: int) -> list[UsageRow]:
    now = time.time()
    return [UsageRow(now, f"req-{i:032x}", f"team-{i % 3}", "chat", "chat", "chat", f"chat#{i % 100}",
                     "/v1/chat/completions", 200, False, 12, 30, 0, 0, 0.0001, 1.5, 0.8, 1, None, "chat")
            for i in range(count)]


async def measure(url: str, batches: int) -> dict[str, float]:
    ledger = Ledger(SqlStore(url))
    await ledger.start()
    prepared = [rows(BATCH) for _ in range(batches)]  # made before: the loop's own work is no wait
    gaps: list[float] = []
    writing = False
    running = True

    async def busy() -> None:
        last = time.perf_counter()
        while running:
            start = time.perf_counter()
            while time.perf_counter() - start < STEP:
                pass
            await asyncio.sleep(0)
            now = time.perf_counter()
            if writing:
                gaps.append(now - last - STEP)
            last = now

    worker = asyncio.get_running_loop().create_task(busy())
    walls = []
    for batch in prepared:
        await asyncio.sleep(0.3)
        for row in batch:
            ledger.record(row)
        writing, started = True, time.perf_counter()
        await ledger.flush()
        walls.append(time.perf_counter() - started)
        writing = False
    running = False
    await worker
    await ledger.aclose()
    held = sorted(gap for gap in gaps if gap > HELD)
    gaps.sort()
    return {
        "batch_wall_ms": sorted(walls)[len(walls) // 2] * 1000,
        "held_ms_per_batch": sum(held) * 1000 / batches,
        "waits_per_batch": len(held) / batches,
        "longest_wait_ms": (held[-1] if held else 0.0) * 1000,
        "gap_p999_ms": gaps[int(len(gaps) * 0.999)] * 1000,
        "lost_ms_per_batch": sum(gaps) * 1000 / batches,  # every wait, however short: the writer's whole cost
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a store URL (default: a SQLite file in a temporary directory)")
    parser.add_argument("--batches", type=int, default=15)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the loop and the writer share a core
    with tempfile.TemporaryDirectory() as directory:
        url = args.url or f"sqlite:///{Path(directory) / 'usage.db'}"
        result = asyncio.run(measure(url, args.batches))
    print(f"{BATCH:,}-row batches, median {result['batch_wall_ms']:.0f} ms each; the loop lost "
          f"{result['lost_ms_per_batch']:.1f} ms a batch, {result['held_ms_per_batch']:.1f} ms of it in "
          f"{result['waits_per_batch']:.1f} waits over {HELD * 1000:.1f} ms, the longest "
          f"{result['longest_wait_ms']:.1f} ms; p99.9 of its gaps {result['gap_p999_ms']:.2f} ms")


if __name__ == "__main__":
    main()
