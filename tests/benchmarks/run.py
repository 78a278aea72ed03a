"""`make bench`: proxykit against a direct connection, a bare aiohttp floor proxy, LiteLLM's proxy
and Portkey's gateway, in one interleaved run. Prints Markdown tables and writes every raw figure as JSON.

    python -m tests.benchmarks.run [--litellm VENV/bin/litellm] [--portkey .../gateway/build/start-server.js]
                                   [--repeat 3] [--more-at-64 4] [--seconds 5] [--quick]

Each proxy is pinned to core 0; this process (the streaming clients), wrk, the mock upstream and
redis to core 1. Every figure is the median of `--repeat` runs with its range (at 64 concurrent
with the upstream answering at once, where the targets are checked, `--more-at-64` runs more);
targets are rotated within each repetition, so drift on a shared machine hits every row alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvloop

from tests.benchmarks.processes import (
    CACHE_HIT,
    CACHE_MISS,
    LOAD_CORE,
    PORTKEY,
    SPLICE,
    STORE_POSTGRES,
    STORE_SQLITE,
    Fleet,
    Target,
    cpu_split,
    peak_rss_mib,
    postgres_database,
    redis_server,
    start_fleet,
)
from tests.benchmarks.store_query import store_queries
from tests.benchmarks.streams import Stream, load, quantile
from tests.benchmarks.throughput import post_script, run_wrk, unique_post_script

RESULTS = Path(__file__).parent / "results"
CONCURRENCY = (1, 16, 64, 256)
LATENCIES_MS = (0, 50)
FULL = "proxykit full"
STREAM_GAP_MS = 2  # between the events of a benchmark stream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--litellm", help="the litellm command of a throwaway virtualenv")
    parser.add_argument("--portkey", help="start-server.js of @portkey-ai/gateway, run with `node`")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="of each wrk run")
    parser.add_argument("--more-at-64", type=int, default=4,
                        help="extra runs of every target at 64 concurrent with the upstream answering at once, "
                             "where the targets are checked")
    parser.add_argument("--soak-streams", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="one repetition of 2 s runs: for trying things")
    parser.add_argument("--only", choices=("plain", "streams", "soak", "store"), action="append",
                        help="run only these parts")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.seconds, args.more_at_64 = 1, 2, 0
    os.sched_setaffinity(0, {LOAD_CORE})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 500 streams through a proxy are 2,000 sockets
    parts = args.only or ["plain", "streams", "soak", "store"]
    tmp = Path(tempfile.mkdtemp(prefix="proxykit-bench-"))
    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "settings": {"repeat": args.repeat, "more_at_64": args.more_at_64, "seconds": args.seconds,
                     "soak_streams": args.soak_streams, "litellm": args.litellm, "portkey": args.portkey},
    }
    with redis_server() as redis_url, postgres_database() as postgres_url:
        if "plain" in parts:
            results["plain"] = plain(tmp, args, redis_url, postgres_url)
    if "store" in parts:
        results["store"] = store_queries(tmp)
    if "streams" in parts:
        results["streams"] = streams(tmp, args)
    if "soak" in parts:
        results["soak"] = soak(tmp, args)
    results["targets"] = targets(results)
    report(results)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{results['when'].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=1, allow_nan=True))
    print(f"\nraw results: {path}")


def plain(
    tmp: Path, args: argparse.Namespace, redis_url: str | None, postgres_url: str | None,
) -> list[dict[str, Any]]:
    """Non-streaming: every concurrency and upstream latency, every target."""
    cells: list[dict[str, Any]] = []
    for latency in LATENCIES_MS:
        with _fleet(tmp, {"MOCK_LATENCY_MS": str(latency)}, args, redis_url, splice=True, cache=True,
                    postgres_url=postgres_url) as fleet:
            runs: dict[tuple[int, str], list[dict[str, float]]] = {}
            rounds: list[tuple[int, ...]] = [CONCURRENCY] * args.repeat
            if latency == 0:
                # The ratios the targets compare come from this point, and runs of the same code here
                # differ by up to ±15% a few seconds apart: more runs, still rotated among the targets.
                rounds += [(64,)] * args.more_at_64
            for concurrencies in rounds:
                for concurrency in concurrencies:
                    for target in fleet.targets:
                        runs.setdefault((concurrency, target.name), []).append(
                            run_wrk(target, concurrency, args.seconds, _script(tmp, target)))
            for (concurrency, name), measured in runs.items():
                cells.append({"latency_ms": latency, "concurrency": concurrency, "target": name, "runs": measured,
                              **_medians(measured)})
    return cells


def _script(tmp: Path, target: Target) -> Path:
    """The wrk script for a target: its headers, and a new body each request or the same one."""
    path = tmp / f"post-{abs(hash((target.headers, target.unique_bodies)))}.lua"
    if not path.exists():
        make = unique_post_script if target.unique_bodies else post_script
        path.write_text(make(target.headers))
    return path


def streams(tmp: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """50 events 2 ms apart, at 1 and 64 concurrent."""
    cells: list[dict[str, Any]] = []
    mock_env = {"MOCK_EVENTS": "50", "MOCK_GAP_MS": str(STREAM_GAP_MS)}
    with _fleet(tmp, mock_env, args, None, splice=True) as fleet:
        # One unmeasured round of 64 first: otherwise the first repetition also times each proxy
        # opening its 64 upstream connections.
        for target in fleet.targets:
            uvloop.run(load(target.url, 64, 1, target.headers))
        runs: dict[tuple[int, str], list[dict[str, float]]] = {}
        for _ in range(args.repeat):
            for concurrency, per_client in ((1, 20), (64, 3)):
                for target in fleet.targets:
                    runs.setdefault((concurrency, target.name), []).append(
                        _measured_streams(target, concurrency, per_client))
        for (concurrency, name), figures in runs.items():
            cells.append({"concurrency": concurrency, "target": name, "runs": figures, **_medians(figures)})
    return cells


def soak(tmp: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--soak-streams` concurrent streams of 10 s (50 events 200 ms apart)."""
    cells: list[dict[str, Any]] = []
    with _fleet(tmp, {"MOCK_EVENTS": "50", "MOCK_GAP_MS": "200"}, args, None) as fleet:
        runs: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.repeat):
            for target in fleet.targets:
                streams_ = uvloop.run(load(target.url, args.soak_streams, 1, target.headers))
                complete = [s for s in streams_ if s is not None and s.done]
                runs.setdefault(target.name, []).append({
                    "completed": len(complete),
                    "first_event_p99_ms": quantile([s.first_event for s in complete], 0.99) * 1000,
                })
        for target in fleet.targets:
            rss = peak_rss_mib(target.pid) if target.pid else float("nan")
            cells.append({"target": target.name, "runs": runs[target.name], "peak_rss_mib": rss,
                          **_medians(runs[target.name])})
    return cells


def _measured_streams(target: Target, concurrency: int, per_client: int) -> dict[str, float]:
    """One run of streams, with the proxy's CPU: at 64 streams whose events come 2 ms apart, a
    core has ~31 µs for each event; a proxy that needs more falls behind and its reads merge."""
    user_before, system_before = cpu_split(target.pid) if target.pid else (0.0, 0.0)
    started = time.perf_counter()
    finished = [s for s in uvloop.run(load(target.url, concurrency, per_client, target.headers)) if s is not None]
    wall = time.perf_counter() - started
    user, system = cpu_split(target.pid) if target.pid else (math.nan, math.nan)
    user, system = user - user_before, system - system_before
    events = sum(s.events for s in finished)
    return {
        **_stream_figures(finished, concurrency * per_client),
        "cpu_us_per_event": (user + system) / events * 1e6 if events else math.nan,
        "kernel_us_per_event": system / events * 1e6 if events else math.nan,
        "core_busy": (user + system) / wall,
    }


def _stream_figures(measured: list[Stream], expected: int) -> dict[str, float]:
    return {
        "completed": sum(s.done for s in measured) / expected,
        "first_event_p50_ms": quantile([s.first_event for s in measured], 0.5) * 1000,
        "first_event_p99_ms": quantile([s.first_event for s in measured], 0.99) * 1000,
        "total_p50_ms": quantile([s.total for s in measured], 0.5) * 1000,
        "largest_gap_p99_ms": quantile([s.largest_gap for s in measured], 0.99) * 1000,
        "events_per_read": sum(s.events for s in measured) / max(1, sum(s.reads for s in measured)),
    }


def _medians(runs: list[dict[str, float]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs if not math.isnan(run[key])]
        figures[key] = statistics.median(values) if values else float("nan")
        figures[f"{key}_range"] = [min(values), max(values)] if values else None
    return figures


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the performance issues (#23, and #18's cache hits), each with what this run
    measured. With the upstream answering at once every proxy is CPU-bound at 64 concurrent, so
    by Little's law a row's latency there grows as its req/s falls: the p99/p50 line tells a
    longer tail (a stall) apart from a uniformly slower row."""
    checks: list[dict[str, Any]] = []

    def check(name: str, required: str, value: float, met: bool) -> None:
        checks.append({"target": name, "required": required, "measured": value, "met": bool(met)})

    plain_cells = results.get("plain", [])
    full, floor, litellm = (_cell(plain_cells, name, 0, 64) for name in (FULL, "floor", "litellm"))
    if full and floor:
        ratio = full["rps"] / floor["rps"]
        check("full stack req/s at 64 vs floor", ">= 0.70", ratio, ratio >= 0.7)
        ratio = full["p99_ms"] / floor["p99_ms"]
        check("full stack p99 at 64 vs floor's", "<= 1.5x", ratio, ratio <= 1.5)
    if full and litellm:
        ratio = full["rps"] / litellm["rps"]
        check("full stack req/s at 64 vs LiteLLM", ">= 50x", ratio, ratio >= 50)
    for concurrency in (64, 256):
        slow_full, slow_floor = (_cell(plain_cells, name, 50, concurrency) for name in (FULL, "floor"))
        if slow_full and slow_floor:
            ratio = slow_full["rps"] / slow_floor["rps"]
            check(f"50 ms upstream: full stack req/s at {concurrency} vs floor", ">= 0.95", ratio, ratio >= 0.95)
    for latency, figure, limit in ((0, "p50_ms", 0.1), (50, "mean_ms", 0.5)):
        one_full, one_floor = (_cell(plain_cells, name, latency, 1) for name in (FULL, "floor"))
        if one_full and one_floor:
            extra = one_full.get(figure, math.nan) - one_floor.get(figure, math.nan)
            what = "p50" if figure == "p50_ms" else "mean latency"
            check(f"{latency} ms upstream: full stack {what} at 1 minus floor's (ms)", f"<= +{limit}", extra,
                  extra <= limit)
    hits = _cell(plain_cells, CACHE_HIT, 0, 64)
    if hits and floor:
        ratio = hits["rps"] / floor["rps"]
        check("cache hits req/s at 64 vs floor (#18)", ">= 2x", ratio, ratio >= 2)
    # Rows that add one thing to the full stack: their req/s and tail against the full stack's.
    for name, label, needed in ((CACHE_MISS, "cache misses", 0.95), (STORE_SQLITE, "sqlite store", 0.90),
                                (STORE_POSTGRES, "postgresql store", 0.90)):
        added = _cell(plain_cells, name, 0, 64)
        if added and full:
            ratio = added["rps"] / full["rps"]
            check(f"{label} req/s at 64 vs full stack", f">= {needed:.2f}", ratio, ratio >= needed)
            worse = added["p99_ms"] / full["p99_ms"]
            check(f"{label} p99 at 64 vs full stack", "<= 1.0x (noise aside)", worse, worse <= 1.1)
            shape = (added["p99_ms"] / added["p50_ms"]) / (full["p99_ms"] / full["p50_ms"])
            check(f"{label} p99/p50 at 64 vs full stack's", "<= 1.0x (noise aside)", shape, shape <= 1.1)
    query = results.get("store", {}).get("usage_30_days_ms")
    if query is not None:
        check("/stats/usage over 30 days, 1M rows in SQLite (ms)", "< 200", query, query < 200)
    stream_cells = results.get("streams", [])
    full_s, floor_s = (_cell(stream_cells, name, None, 64) for name in (FULL, "floor"))
    if full_s and floor_s:
        ratio = full_s["first_event_p99_ms"] / floor_s["first_event_p99_ms"]
        check("streaming first event p99 at 64 vs floor", "<= 1.5x", ratio, ratio <= 1.5)
        check("events per read at 64", "1.0", full_s["events_per_read"], full_s["events_per_read"] < 1.01)
    soak_full = next((c for c in results.get("soak", []) if c["target"] == FULL), None)
    if soak_full:
        expected = results["settings"]["soak_streams"]
        check("soak streams completed", f"{expected} of {expected}", soak_full["completed"],
              min(run["completed"] for run in soak_full["runs"]) == expected)
        check("soak peak RSS (MiB)", "< 80", soak_full["peak_rss_mib"], soak_full["peak_rss_mib"] < 80)
    return checks


def _cell(cells: list[dict[str, Any]], target: str, latency: int | None, concurrency: int) -> dict[str, Any] | None:
    return next((c for c in cells if c["target"] == target and c["concurrency"] == concurrency
                 and c.get("latency_ms") == latency), None)


def report(results: dict[str, Any]) -> None:
    if cells := results.get("plain"):
        print("\n## Non-streaming (~1 KB chat completion; median of runs, range in brackets)\n")
        print("| upstream | conc. | target | req/s | vs floor | vs LiteLLM | p50 ms | p99 ms | p99.9 ms "
              "| added p50 ms | CPU s / 1k req | vs floor | longest loop stall ms | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for cell in cells:
            key = (cell["latency_ms"], cell["concurrency"])
            same = [c for c in cells if (c["latency_ms"], c["concurrency"]) == key]
            floor, litellm, direct = (_named(same, name) for name in ("floor", "litellm", "direct"))
            low, high = cell["rps_range"]
            print(f"| {cell['latency_ms']} ms | {cell['concurrency']} | {cell['target']} "
                  f"| {cell['rps']:,.0f} [{low:,.0f}-{high:,.0f}] | {_ratio(cell, floor, 'rps', 2)} "
                  f"| {_ratio(cell, litellm, 'rps', 1)} | {cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} "
                  f"| {_num(cell.get('p999_ms', math.nan), 2)} | {_added(cell, direct)} "
                  f"| {_num(cell['cpu_s_per_1k'], 3)} | {_ratio(cell, floor, 'cpu_s_per_1k', 2)} "
                  f"| {_num(cell.get('loop_stall_ms', math.nan), 1)} | {cell['errors']:.0f} |")
        if (portkey := _cell(cells, PORTKEY, 0, 64)) and (full := _cell(cells, FULL, 0, 64)):
            print(f"\nPortkey's gateway (Node) at 64 concurrent, the upstream answering at once: "
                  f"{portkey['rps']:,.0f} req/s, p99 {portkey['p99_ms']:.1f} ms; proxykit full "
                  f"{full['rps'] / portkey['rps']:.1f}x its req/s, p99 {full['p99_ms']:.1f} ms.")
        if (splice := _cell(cells, SPLICE, 0, 64)) and (full := _cell(cells, FULL, 0, 64)):
            print(f"\nThe {SPLICE} copies bytes between sockets and parses no HTTP: at 64 concurrent, with "
                  f"the upstream answering at once, its {splice['rps']:,.0f} req/s are the most any Python relay "
                  f"passes on this core; proxykit full served {full['rps'] / splice['rps']:.2f} of it.")
    if cells := results.get("streams"):
        print("\n## Streaming (50 events 2 ms apart)\n")
        print("| conc. | target | first event p50 / p99 ms | p99 vs floor | total p50 ms | largest gap p99 ms "
              "| events per read | completed | proxy CPU µs / event (kernel) | proxy core busy |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for cell in cells:
            floor = _named([c for c in cells if c["concurrency"] == cell["concurrency"]], "floor")
            print(f"| {cell['concurrency']} | {cell['target']} | {cell['first_event_p50_ms']:.1f} / "
                  f"{cell['first_event_p99_ms']:.1f} | {_ratio(cell, floor, 'first_event_p99_ms', 2)} "
                  f"| {cell['total_p50_ms']:.0f} | {cell['largest_gap_p99_ms']:.1f} | {cell['events_per_read']:.2f} "
                  f"| {cell['completed']:.0%} | {_cpu_per_event(cell)} | {_percent(cell['core_busy'])} |")
        budget_us = STREAM_GAP_MS * 1000 / 64
        print(f"\nAt 64 concurrent, 64 events come every {STREAM_GAP_MS} ms: a proxy has ~{budget_us:.0f} µs of its "
              "core per event (the CPU figure includes each stream's start). Above that, events wait and reads "
              "find several.")
        if splice := _cell(cells, SPLICE, None, 64):
            print(f"The {SPLICE} only copies bytes between sockets, no HTTP: the least a Python relay can do. "
                  f"At 64 it read {splice['events_per_read']:.2f} events per read at "
                  f"{_num(splice['cpu_us_per_event'], 1)} µs per event: what this machine allows any proxy "
                  "under this load.")
    if store := results.get("store"):
        print(f"\n## Management API reads over a SQLite store of {store['rows']:,} rows over 30 days\n")
        print(f"(written through the store's batch path in {store['fill_seconds']} s; median of 5, max in brackets)\n")
        print("| route | ms |")
        print("|---|---|")
        for name in ("usage_30_days_ms", "usage_one_client_ms", "performance_60_min_ms", "requests_newest_50_ms",
                     "request_by_id_ms", "oldest_request_by_id_ms"):
            print(f"| {name.removesuffix('_ms').replace('_', ' ')} | {store[name]:.1f} "
                  f"[{store[name.removesuffix('_ms') + '_max_ms']:.1f}] |")
    if cells := results.get("soak"):
        print(f"\n## {results['settings']['soak_streams']} concurrent streams of 10 s\n")
        print("| target | completed (min) | first event p99 ms | peak RSS MiB |")
        print("|---|---|---|---|")
        for cell in cells:
            least = min(run["completed"] for run in cell["runs"])
            print(f"| {cell['target']} | {cell['completed']:.0f} ({least}) | {cell['first_event_p99_ms']:,.0f} "
                  f"| {_num(cell['peak_rss_mib'], 0)} |")
    if checks := results.get("targets"):
        print("\n## Targets (proxykit full stack, this run)\n")
        print("| target | required | measured | met |")
        print("|---|---|---|---|")
        for item in checks:
            met = "yes" if item["met"] else "NO"
            print(f"| {item['target']} | {item['required']} | {item['measured']:.2f} | {met} |")


def _named(cells: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((c for c in cells if c["target"] == name), None)


def _ratio(cell: dict[str, Any], other: dict[str, Any] | None, key: str, digits: int) -> str:
    if other is None or cell is other or not other[key] or math.isnan(other[key]) or math.isnan(cell[key]):
        return "-"
    return f"{cell[key] / other[key]:.{digits}f}x"


def _added(cell: dict[str, Any], direct: dict[str, Any] | None) -> str:
    return "-" if direct is None or cell is direct else f"{cell['p50_ms'] - direct['p50_ms']:+.2f}"


def _cpu_per_event(cell: dict[str, Any]) -> str:
    if math.isnan(cell["cpu_us_per_event"]):
        return "-"
    return f"{cell['cpu_us_per_event']:.1f} ({cell['kernel_us_per_event']:.1f})"


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0%}"


def _num(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


@contextmanager
def _fleet(
    tmp: Path, mock_env: dict[str, str], args: argparse.Namespace, redis_url: str | None, *, splice: bool = False,
    cache: bool = False, postgres_url: str | None = None,
) -> Iterator[Fleet]:
    fleet = start_fleet(tmp, mock_env=mock_env, litellm=args.litellm, portkey=args.portkey, redis_url=redis_url,
                        splice=splice, cache=cache, postgres_url=postgres_url)
    try:
        yield fleet
    finally:
        fleet.close()


if __name__ == "__main__":
    main()
