"""What the in-process timings (`store_layer`, `cache_layer`) share: the command line and the line
they print."""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Callable, Coroutine
from typing import Any


def report(what: str, costs_us: list[float], requests: int) -> None:
    """The least and the median of the rounds' costs, in µs a request."""
    print(f"{what}: {min(costs_us):.2f} µs a request at least, {statistics.median(costs_us):.2f} the median "
          f"({len(costs_us)} rounds of {requests:,} requests)")


def from_command_line(doc: str | None, main: Callable[[int, int], Coroutine[Any, Any, None]], *, requests: int,
                      rounds: int) -> None:
    """Runs `main(requests, rounds)` with `--requests` and `--rounds` from the command line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
