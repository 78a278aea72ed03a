"""The processes a benchmark runs: the mock upstream, the floor proxy, the TCP splice, proxykit,
LiteLLM's proxy and Portkey's gateway.

Each proxy is pinned to core 0 (`taskset`); the mock, redis and the load generator to core 1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

PROXY_CORE, LOAD_CORE = 0, 1
CLIENT_KEY = "pk-bench"
SPLICE = "tcp splice"
CACHE_HIT, CACHE_MISS = "proxykit full, cache hits", "proxykit full, cache misses"
STORE_SQLITE, STORE_POSTGRES = "proxykit full, sqlite store", "proxykit full, postgresql store"
PORTKEY = "portkey"

# No cost-map download at start, quiet logs, and no master key: it would refuse to start without one.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
# Portkey refuses a custom host on a private address unless it is trusted.
PORTKEY_ENV = {"TRUSTED_CUSTOM_HOSTS": "127.0.0.1"}


Headers = tuple[tuple[str, str], ...]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], core: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", str(core), *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes] | None = None, headers: Headers = ()) -> None:
    for _ in range(2400):  # LiteLLM takes a while to start
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process for {url} exited with {process.returncode}")
        try:
            httpx.post(f"{url}/v1/chat/completions", json={"model": "bench"}, timeout=1,
                       headers={"authorization": f"Bearer {CLIENT_KEY}", **dict(headers)})
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not start")


def _tree(pid: int) -> Iterator[int]:
    """A process and all its descendants (LiteLLM may fork its server)."""
    pending = [pid]
    while pending:
        current = pending.pop()
        yield current
        with suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system (kernel) CPU time of a process tree."""
    ticks, user, system = os.sysconf("SC_CLK_TCK"), 0.0, 0.0
    for current in _tree(pid):
        with suppress(OSError):
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            user += int(fields[11]) / ticks
            system += int(fields[12]) / ticks
    return user, system


def peak_rss_mib(pid: int) -> float:
    """The largest resident set each process of the tree reached, added up."""
    total = 0.0
    for current in _tree(pid):
        with suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return total


def proxykit_config(
    upstream: str, *, full: bool, redis_url: str | None = None, cache: bool = False, store: str = "none",
) -> dict[str, object]:
    """Bare: forwarding only (no auth, no metrics, no retry, one key, no store). Full: auth, a pool
    of 100 upstream keys with usage-based rotation, client limits too high to trigger, retry,
    metrics, no store unless `store` names one; `cache`: and the response cache in memory."""
    if not full:
        return {
            "models": [{"name": "bench", "deployments": [{"base_url": f"{upstream}/v1", "api_keys": ["sk-bench"]}]}],
            "metrics": {"enabled": False},
            "retry": {"attempts": 0},
            "store": {"url": "none"},
        }
    data: dict[str, object] = {
        "models": [{"name": "bench", "deployments": [
            {"base_url": f"{upstream}/v1", "api_keys": [f"sk-bench-{i}" for i in range(100)]}]}],
        "auth": {"keys": [{"name": "bench", "key": CLIENT_KEY, "rpm": 10**8, "tpm": 10**10}]},
        "routing": {"strategy": "usage-based"},
        "metrics": {"enabled": True},
        "store": {"url": store},
    }
    if redis_url:
        data["limits"] = {"backend": "redis", "redis_url": redis_url}
    if cache:
        data["cache"] = {"enabled": True}
    return data


def litellm_config(upstream: str) -> dict[str, object]:
    """LiteLLM's fastest honest setup: one model in front of the same mock, no database, quiet logs."""
    return {
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/bench", "api_base": f"{upstream}/v1", "api_key": "sk-bench"}}],
        "litellm_settings": {"set_verbose": False, "json_logs": False, "turn_off_message_logging": True},
    }


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # the proxy's process, for CPU and memory; None for the direct connection
    unique_bodies: bool = False  # every request a new body: with the cache on, every one a miss
    headers: Headers = ()  # what every request must carry besides the client key (Portkey's routing)


@dataclass
class Fleet:
    """One mock upstream and every proxy in front of it."""

    targets: list[Target] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def close(self) -> None:
        stop(self.processes)


def start_fleet(
    tmp: Path, *, mock_env: dict[str, str], litellm: str | None, portkey: str | None = None,
    redis_url: str | None = None, splice: bool = False, cache: bool = False, postgres_url: str | None = None,
) -> Fleet:
    """`splice`: also the raw TCP splice, the least a Python relay can do. The streaming part asks
    for it: it shows whether this machine can relay the streams one event a read at all."""
    fleet = Fleet()
    try:
        _start_fleet(fleet, tmp, mock_env=mock_env, litellm=litellm, portkey=portkey, redis_url=redis_url,
                     splice=splice, cache=cache, postgres_url=postgres_url)
    except BaseException:
        fleet.close()
        raise
    return fleet


def _start_fleet(
    fleet: Fleet, tmp: Path, *, mock_env: dict[str, str], litellm: str | None, portkey: str | None,
    redis_url: str | None, splice: bool, cache: bool, postgres_url: str | None,
) -> None:
    def add(name: str, command: list[str], port: int, core: int, env: dict[str, str] | None = None,
            headers: Headers = ()) -> None:
        process = start(command, core, env)
        fleet.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        fleet.targets.append(Target(name, url, process.pid if core == PROXY_CORE else None, headers=headers))
        wait_ready(url, process, headers)

    python = sys.executable
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    add("direct", [python, "-m", "tests.benchmarks.mock_upstream", "--port", str(port)], port, LOAD_CORE, mock_env)
    port = free_port()
    add("floor", [python, "-m", "uvicorn", "tests.benchmarks.floor_proxy:app", "--port", str(port),
                  "--log-level", "warning", "--no-access-log"], port, PROXY_CORE, {"FLOOR_UPSTREAM": upstream})
    if splice:
        port = free_port()
        add(SPLICE, [python, "-m", "tests.benchmarks.splice_proxy", "--port", str(port),
                     "--upstream", upstream.removeprefix("http://")], port, PROXY_CORE)
    variants = {"proxykit bare": proxykit_config(upstream, full=False),
                "proxykit full": proxykit_config(upstream, full=True)}
    if redis_url:
        variants["proxykit full, redis"] = proxykit_config(upstream, full=True, redis_url=redis_url)
    if cache:  # the plain part: the store's rows ride along with the cache's
        variants[STORE_SQLITE] = proxykit_config(upstream, full=True, store=f"sqlite:///{tmp}/store-{free_port()}.db")
        if postgres_url:
            variants[STORE_POSTGRES] = proxykit_config(upstream, full=True, store=postgres_url)
    if cache:
        variants[CACHE_HIT] = proxykit_config(upstream, full=True, cache=True)
    for name, data in variants.items():
        port = free_port()
        path = tmp / f"proxykit-{port}.yaml"
        path.write_text(yaml.safe_dump(data))
        add(name, [python, "-m", "proxykit", "serve", "--config", str(path), "--port", str(port),
                   "--log-level", "warning"], port, PROXY_CORE)
    if cache:  # the same process, asked a new body each time
        hit = fleet.targets[-1]
        fleet.targets.append(Target(CACHE_MISS, hit.url, hit.pid, unique_bodies=True))
    if litellm:
        port = free_port()
        path = tmp / f"litellm-{port}.yaml"
        path.write_text(yaml.safe_dump(litellm_config(upstream)))
        add("litellm", [litellm, "--config", str(path), "--port", str(port), "--num_workers", "1"], port,
            PROXY_CORE, LITELLM_ENV)
    if portkey:
        port = free_port()
        add(PORTKEY, ["node", portkey, f"--port={port}", "--headless"], port, PROXY_CORE, PORTKEY_ENV,
            headers=(("x-portkey-provider", "openai"), ("x-portkey-custom-host", f"{upstream}/v1")))


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A throwaway PostgreSQL cluster on the load core, for the `postgresql store` row, when
    Debian's postgresql is installed; one database for each fleet (`postgresql://.../bench_N`)."""
    from tests.postgres import BIN_DIR, PostgresServer

    if BIN_DIR is None:
        yield None
        return
    server = PostgresServer(BIN_DIR)
    try:
        server.start()
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
        subprocess.run(["taskset", "-a", "-p", "-c", str(LOAD_CORE), str(postmaster)], check=True,
                       stdout=subprocess.DEVNULL)
        yield server.url()
    finally:
        server.remove()


@contextmanager
def redis_server() -> Iterator[str | None]:
    """A throwaway redis-server for the `proxykit full, redis` row, when Debian's is installed."""
    if not shutil.which("redis-server"):
        yield None
        return
    port = free_port()
    process = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                    LOAD_CORE)
    try:
        wait_for_port(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop([process])


def wait_for_port(port: int, process: subprocess.Popen[bytes], tries: int = 200) -> None:
    for _ in range(tries):
        if process.poll() is not None:
            raise RuntimeError("redis-server exited")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")
