"""Closed-loop load with wrk (Debian's package) on a non-streaming ~1 KB chat completion:
requests/s, p50/p99 latency, errors, and the proxy's CPU seconds per 1,000 requests."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx

from tests.benchmarks.processes import CLIENT_KEY, LOAD_CORE, Headers, Target, cpu_seconds

# wrk prints p50/p75/p90/p99 and a rounded mean only; the tail past p99 and the exact mean are
# asked of its latency histogram.
_TAIL = """done = function(summary, latency, requests)
  io.write(string.format("p999_us %d\\n", latency:percentile(99.9)))
  io.write(string.format("mean_us %d\\n", latency.mean))
end
"""

def post_script(headers: Headers = ()) -> str:
    """The same body every request."""
    extra = "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in headers)
    return f"""wrk.method = "POST"
wrk.body = '{{"model": "bench", "messages": [{{"role": "user", "content": "hello"}}]}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {CLIENT_KEY}"
{extra}""" + _TAIL


def unique_post_script(headers: Headers = ()) -> str:
    """Every request a body never sent before (a `user` from a counter that starts at the run's
    second times a million), so with the cache on every one is a miss."""
    extra = "".join(f', ["{name}"] = "{value}"' for name, value in headers)
    return f"""counter = os.time() % 1000000 * 1000000
request = function()
  counter = counter + 1
  local body = '{{"model": "bench", "user": "' .. counter .. '", "messages": [{{"role": "user", "content": "hello"}}]}}'
  local headers = {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {CLIENT_KEY}"{extra}}}
  return wrk.format("POST", nil, headers, body)
end
""" + _TAIL


_SCALE_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(output: str, label: str) -> float:
    found = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    return float(found.group(1)) * _SCALE_MS[found.group(2)] if found else float("nan")


def _from_script(output: str, name: str) -> float:
    """A figure the `done` script printed, in ms."""
    found = re.search(rf"^{name} (\d+)$", output, re.MULTILINE)
    return float(found.group(1)) / 1000 if found else float("nan")


def run_wrk(target: Target, concurrency: int, seconds: int, script: Path) -> dict[str, float]:
    # Back to back, the connections of the run before were seen to delay some of the next run's
    # hundreds of new connections by 1-4 s, through the floor as through proxykit (whose own
    # access log showed nothing over 0.2 s): a pause lets the loopback settle.
    time.sleep(1)
    _loop_stall_ms(target)  # read once before: the probe reports the worst since the last read
    cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
    output = subprocess.run(
        ["taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s",
         "--latency", "-s", str(script), f"{target.url}/v1/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout
    cpu = cpu_seconds(target.pid) - cpu_before if target.pid else float("nan")
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(output, "50%"),
        "p99_ms": _ms(output, "99%"),
        "p999_ms": _from_script(output, "p999_us"),
        "mean_ms": _from_script(output, "mean_us"),
        "loop_stall_ms": _loop_stall_ms(target),
        "requests": requests,
        "errors": errors,
        "cpu_s_per_1k": cpu / requests * 1000 if requests else float("nan"),
    }


def _loop_stall_ms(target: Target) -> float:
    """The longest event-loop stall of a proxykit target since the last read of its metrics."""
    if not target.name.startswith("proxykit"):
        return float("nan")
    try:
        text = httpx.get(f"{target.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return float("nan")
    found = re.search(r"^proxykit_event_loop_lag_seconds ([\d.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) * 1000 if found else float("nan")
