"""Requests/s and added latency of proxykit configurations against a direct connection and a bare
aiohttp floor proxy, measured with wrk (Debian's package) in one interleaved run.

    python -m tests.benchmarks.throughput [--seconds 5] [--repeat 3]

Each proxy is pinned to core 0, the mock upstream and wrk to core 1. Needs `wrk`, `taskset`, and
`redis-server` for the redis row.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

POST = 'wrk.method = "POST"\nwrk.body = \'{"model": "bench", "messages": [{"role": "user", "content": "hello"}]}\'\n' \
       'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer pk-bench"\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], core: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", str(core), *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def _ratio(rate: float, litellm_rate: float) -> str:
    return "-" if math.isnan(litellm_rate) else f"{rate / litellm_rate:.1f}x"


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait()


def wait_ready(url: str) -> None:
    for _ in range(1200):  # LiteLLM takes a while to start
        try:
            httpx.post(f"{url}/v1/chat/completions", json={"model": "bench"}, timeout=1,
                       headers={"authorization": "Bearer pk-bench"})
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not start")


def config(
    upstream: str, *, full: bool, metrics: bool, redis_url: str | None = None, client_limits: bool = True
) -> dict[str, object]:
    keys = [f"sk-bench-{i}" for i in range(100 if full else 4)]
    data: dict[str, object] = {
        "models": [{"name": "bench", "deployments": [{"base_url": f"{upstream}/v1", "api_keys": keys}]}],
        "metrics": {"enabled": metrics},
    }
    if full:
        limits = {"rpm": 10**8, "tpm": 10**10} if client_limits else {}  # never reached, but checked
        data["auth"] = {"keys": [{"name": "bench", "key": "pk-bench", **limits}]}
        data["routing"] = {"strategy": "usage-based"}
    if redis_url:
        data["limits"] = {"backend": "redis", "redis_url": redis_url}
    return data


# No cost-map download at start, quiet logs, and no master key: it would refuse to start without one.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}


def litellm_config(upstream: str) -> dict[str, object]:
    """LiteLLM's fastest honest setup: one model in front of the same mock, no database, quiet logs."""
    return {
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/bench", "api_base": f"{upstream}/v1", "api_key": "sk-bench"}}],
        "litellm_settings": {"set_verbose": False, "json_logs": False, "turn_off_message_logging": True},
    }


def wrk(url: str, connections: int, seconds: int, script: Path) -> tuple[float, float]:
    output = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
         f"{url}/v1/chat/completions"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", output)
    assert p50 is not None
    scale = {"us": 1e-3, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    return rps, float(p50.group(1)) * scale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--litellm", help="the litellm command of a throwaway virtualenv")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="proxykit-bench-"))
    script = tmp / "post.lua"
    script.write_text(POST)
    processes = []
    try:
        upstream_port = free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        processes.append(start([sys.executable, "-m", "uvicorn", "tests.benchmarks.mock_upstream:app", "--port",
                                str(upstream_port), "--log-level", "warning", "--no-access-log"], core=1))
        targets = {"direct": upstream}
        floor_port = free_port()
        processes.append(start([sys.executable, "-m", "uvicorn", "tests.benchmarks.floor_proxy:app", "--port",
                                str(floor_port), "--log-level", "warning", "--no-access-log"], core=0,
                               env={"FLOOR_UPSTREAM": upstream}))
        targets["floor (bare aiohttp proxy)"] = f"http://127.0.0.1:{floor_port}"
        variants = {
            "proxykit, metrics off": config(upstream, full=False, metrics=False),
            "proxykit, defaults (metrics on)": config(upstream, full=False, metrics=True),
            "proxykit, auth + 100 keys + retry + metrics, no client limits": config(
                upstream, full=True, metrics=True, client_limits=False),
            "proxykit, full stack (auth, 100 keys, limits, retry, metrics)": config(upstream, full=True, metrics=True),
        }
        if shutil.which("redis-server"):
            redis_port = free_port()
            processes.append(start(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                                   core=1))
            variants["proxykit, full stack, redis limits"] = config(
                upstream, full=True, metrics=True, redis_url=f"redis://127.0.0.1:{redis_port}/0")
        for name, data in variants.items():
            port = free_port()
            path = tmp / f"{port}.yaml"
            path.write_text(yaml.safe_dump(data))
            processes.append(start([sys.executable, "-m", "proxykit", "serve", "--config", str(path), "--port",
                                    str(port), "--log-level", "warning"], core=0))
            targets[name] = f"http://127.0.0.1:{port}"
        if args.litellm:
            port = free_port()
            path = tmp / "litellm.yaml"
            path.write_text(yaml.safe_dump(litellm_config(upstream)))
            processes.append(start([args.litellm, "--config", str(path), "--port", str(port), "--num_workers", "1"],
                                   core=0, env=LITELLM_ENV))
            targets["litellm proxy (1 worker, no DB, logs off)"] = f"http://127.0.0.1:{port}"
        for url in targets.values():
            wait_ready(url)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every row alike
            for name, url in targets.items():
                rps, _ = wrk(url, 64, args.seconds, script)
                _, p50 = wrk(url, 1, max(2, args.seconds // 2), script)
                results[name].append((rps, p50))
        floor_rps = statistics.median(r for r, _ in results["floor (bare aiohttp proxy)"])
        litellm_runs = next((runs for name, runs in results.items() if name.startswith("litellm")), None)
        litellm_rps = statistics.median(r for r, _ in litellm_runs) if litellm_runs else float("nan")
        direct_p50 = statistics.median(p for _, p in results["direct"])
        print("| target | req/s at 64 (median, range) | vs floor | vs litellm | p50 at 1 (ms) | added p50 (ms) |")
        print("|---|---|---|---|---|---|")
        for name, runs in results.items():
            rates = [rate for rate, _ in runs]
            latency = statistics.median(p for _, p in runs)
            print(f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f} to {max(rates):,.0f}) | "
                  f"{statistics.median(rates) / floor_rps:.2f} | {_ratio(statistics.median(rates), litellm_rps)} "
                  f"| {latency:.2f} | {latency - direct_p50:+.2f} |")
    finally:
        stop(processes)


if __name__ == "__main__":
    main()
