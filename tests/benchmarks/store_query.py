"""The management API's reads over a large SQLite store: 1 million rows over 30 days, read
through a real `proxykit serve` (its HTTP stack included), each route timed 5 times."""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from proxykit.store.base import UsageRow
from proxykit.store.sql import SqlStore
from tests.benchmarks.processes import PROXY_CORE, free_port, start, stop

ROWS = 1_000_000
DAYS = 30
BATCH = 50_000
MODELS = [f"model-{i}" for i in range(8)]
CLIENTS = [f"team-{i}" for i in range(20)]
ROUTES = {
    "usage_30_days_ms": "/api/llm/stats/usage",
    "usage_one_client_ms": "/api/llm/stats/usage?client=team-3",
    "performance_60_min_ms": "/api/llm/stats/performance?minutes=60",
    "requests_newest_50_ms": "/api/llm/requests?limit=50",
    "request_by_id_ms": "/api/llm/requests/req-999999",
    "oldest_request_by_id_ms": "/api/llm/requests/req-10000",  # 29.7 days old: a scan of nearly all
}


def fill(path: Path) -> float:
    """Writes the rows through the store's own write path; returns the seconds it took."""
    store = SqlStore(f"sqlite:///{path}")
    now = time.time()
    chance = random.Random(7)
    started = time.perf_counter()
    for first in range(0, ROWS, BATCH):
        rows = []
        for i in range(first, first + BATCH):
            model, client = chance.choice(MODELS), chance.choice(CLIENTS)
            status = 200 if chance.random() < 0.97 else chance.choice((429, 500, 499))
            rows.append(UsageRow(
                time=now - DAYS * 86400 * (1 - i / ROWS), request_id=f"req-{i}", client=client, model=model,
                served_model=model, deployment=model, key=f"{model}#{i % 50}", path="/v1/chat/completions",
                status=status, stream=i % 2 == 0, prompt_tokens=chance.randint(10, 2000),
                completion_tokens=chance.randint(1, 800), reasoning_tokens=0, cached_tokens=0, cost_usd=0.001,
                duration_ms=chance.uniform(100, 4000), ttfb_ms=chance.uniform(50, 500), attempts=1, cache=None,
                totals_model=model,
            ))
        store.write(rows)
    store.close()
    return time.perf_counter() - started


def store_queries(tmp: Path) -> dict[str, Any]:
    path = tmp / "million.db"
    print(f"store: writing {ROWS:,} rows over {DAYS} days into SQLite ...", flush=True)
    results: dict[str, Any] = {"rows": ROWS, "fill_seconds": round(fill(path), 1)}
    config = tmp / "store-query.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": name, "deployments": [{"base_url": "http://127.0.0.1:9/v1"}]} for name in MODELS],
        "store": {"url": f"sqlite:///{path}"},
    }))
    port = free_port()
    process = start([sys.executable, "-m", "proxykit", "serve", "--config", str(config), "--port", str(port),
                     "--log-level", "warning"], PROXY_CORE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(400):
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            for name, route in ROUTES.items():
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    response = client.get(route)
                    times.append((time.perf_counter() - started) * 1000)
                    response.raise_for_status()
                results[name] = round(statistics.median(times), 1)
                results[name.removesuffix("_ms") + "_max_ms"] = round(max(times), 1)
            usage = client.get(ROUTES["usage_30_days_ms"]).json()
            results["usage_total_requests"] = usage["total_requests"]
    finally:
        stop([process])
    return results



