"""Streaming through proxykit, a bare aiohttp floor proxy and LiteLLM's proxy, against a direct
connection: time to first event, largest gap between events, events per socket read (1.0: nothing
coalesced), and 500 concurrent 10-second streams (completed, first-event p99, peak RSS).

    taskset -c 1 python -m tests.benchmarks.streams [--repeat 3] [--litellm /path/to/venv/bin/litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

from tests.benchmarks.throughput import LITELLM_ENV, config, free_port, litellm_config, start, stop, wait_ready

CHAT = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
HEADERS = {"authorization": "Bearer pk-bench"}


@dataclass
class Stream:
    first_event: float
    total: float
    largest_gap: float
    events: int
    reads: int
    done: bool  # ended with [DONE]: the client got the whole stream


async def one_stream(session: aiohttp.ClientSession, url: str) -> Stream | None:
    started = time.perf_counter()
    arrivals, events, reads, done = [], 0, 0, False
    try:
        async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=HEADERS) as response:
            if response.status != 200:
                return None
            async for chunk in response.content.iter_any():
                done = done or b"[DONE]" in chunk
                count = chunk.count(b"data: {")
                if count:
                    arrivals.append(time.perf_counter())
                    events += count
                    reads += 1
    except aiohttp.ClientError:
        return None
    if not arrivals:
        return None
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    return Stream(arrivals[0] - started, time.perf_counter() - started, max(gaps, default=0.0), events, reads, done)


async def load(url: str, concurrency: int, per_worker: int) -> list[Stream | None]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker() -> list[Stream | None]:
            return [await one_stream(session, url) for _ in range(per_worker)]

        batches = await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [stream for batch in batches for stream in batch]


def p(values: list[float], quantile: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] if ordered else float("nan")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


Targets = tuple[dict[str, str], dict[str, int], list[subprocess.Popen[bytes]]]


def start_targets(tmp: Path, upstream: str, litellm: str | None) -> Targets:
    processes: list[subprocess.Popen[bytes]] = []
    urls, pids = {"direct": upstream}, {}
    port = free_port()
    floor = start([sys.executable, "-m", "uvicorn", "tests.benchmarks.floor_proxy:app", "--port", str(port),
                   "--log-level", "warning", "--no-access-log"], core=0, env={"FLOOR_UPSTREAM": upstream})
    processes.append(floor)
    urls["floor"], pids["floor"] = f"http://127.0.0.1:{port}", floor.pid
    port = free_port()
    path = tmp / f"proxykit-{port}.yaml"
    path.write_text(yaml.safe_dump(config(upstream, full=True, metrics=True)))
    proxykit = start([sys.executable, "-m", "proxykit", "serve", "--config", str(path), "--port", str(port),
                      "--log-level", "warning"], core=0)
    processes.append(proxykit)
    urls["proxykit (full stack)"], pids["proxykit (full stack)"] = f"http://127.0.0.1:{port}", proxykit.pid
    if litellm:
        port = free_port()
        path = tmp / f"litellm-{port}.yaml"
        path.write_text(yaml.safe_dump(litellm_config(upstream)))
        process = start([litellm, "--config", str(path), "--port", str(port), "--num_workers", "1"], core=0,
                        env=LITELLM_ENV)
        processes.append(process)
        urls["litellm"], pids["litellm"] = f"http://127.0.0.1:{port}", process.pid
    for url in urls.values():
        wait_ready(url)
    return urls, pids, processes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--litellm", help="the litellm command of a throwaway virtualenv")
    parser.add_argument("--soak-streams", type=int, default=500)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 500 streams are 2,000 sockets
    tmp = Path(tempfile.mkdtemp(prefix="proxykit-streams-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        fast_port, long_port = free_port(), free_port()
        for port, gap_ms in ((fast_port, "2"), (long_port, "200")):
            processes.append(start([sys.executable, "-m", "uvicorn", "tests.benchmarks.mock_upstream:app",
                                    "--port", str(port), "--log-level", "warning", "--no-access-log"], core=1,
                                   env={"MOCK_EVENTS": "50", "MOCK_GAP_MS": gap_ms}))
        fast, _fast_pids, started = start_targets(tmp, f"http://127.0.0.1:{fast_port}", args.litellm)
        processes += started
        print("| target | concurrent | first event p50 / p99 (ms) | total p50 (ms) | largest gap p99 (ms) "
              "| events per read |")
        print("|---|---|---|---|---|---|")
        for concurrency, per_worker in ((1, 20), (64, 5)):
            for name, url in fast.items():
                runs: list[list[Stream]] = []
                for _ in range(args.repeat):
                    streams = [s for s in asyncio.run(load(url, concurrency, per_worker)) if s is not None]
                    runs.append(streams)
                ttfe = [statistics.median(s.first_event for s in run) * 1000 for run in runs]
                ttfe99 = [p([s.first_event for s in run], 0.99) * 1000 for run in runs]
                total = [statistics.median(s.total for s in run) * 1000 for run in runs]
                gap = [p([s.largest_gap for s in run], 0.99) * 1000 for run in runs]
                per_read = [sum(s.events for s in run) / sum(s.reads for s in run) for run in runs]
                print(f"| {name} | {concurrency} | {statistics.median(ttfe):.1f} / {statistics.median(ttfe99):.1f} "
                      f"| {statistics.median(total):.0f} | {statistics.median(gap):.1f} "
                      f"| {statistics.median(per_read):.2f} |")
        stop(started)
        slow, slow_pids, started = start_targets(tmp, f"http://127.0.0.1:{long_port}", args.litellm)
        processes += started
        print(f"\n| target | {args.soak_streams} streams of 10 s: completed | first event p99 (ms) | peak RSS (MiB) |")
        print("|---|---|---|---|")
        for name, url in slow.items():
            done: list[int] = []
            soak_first: list[float] = []
            for _ in range(args.repeat):
                finished = asyncio.run(load(url, args.soak_streams, 1))
                ok = [s for s in finished if s is not None and s.done]
                done.append(len(ok))
                soak_first.append(p([s.first_event for s in ok], 0.99) * 1000)
            rss = f"{peak_rss_mib(slow_pids[name]):.0f}" if name in slow_pids else "-"
            print(f"| {name} | {statistics.median(done):.0f} (min {min(done)}) | {statistics.median(soak_first):.0f} "
                  f"| {rss} |")
    finally:
        stop(processes)


if __name__ == "__main__":
    main()
