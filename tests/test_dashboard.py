"""The Grafana dashboard tells the truth: a real Prometheus scrapes a real `proxykit serve --demo`,
and every PromQL expression of every panel returns data after mixed traffic."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from proxykit.demo import DemoUpstream, demo_config
from tests.conftest import free_port, proxykit_process, serve, wait_until_up

pytestmark = pytest.mark.anyio

DASHBOARD = Path(__file__).parents[1] / "grafana" / "dashboards" / "proxykit.json"
VARIABLES = {"$model": ".*", "$__rate_interval": "1m", "$__range": "5m"}
PROMETHEUS = shutil.which("prometheus")


STORE_ROW = "Budgets and store"  # needs a budgeted client: its own test, below


def panel_expressions(*, store_row: bool = False) -> list[tuple[str, str]]:
    """Each panel's queries, with the dashboard's variables filled in: the store row's, or the others'."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        if (row == STORE_ROW) != store_row:
            continue
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            found.append((panel["title"], expr))
    return found


def test_dashboard_is_importable_as_is() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dashboard  # no import-time prompt: the data source is a variable
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    titles = {panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"}
    assert titles == {"Traffic", "Latency", "Upstream keys", "Limits", "Tokens and cost", STORE_ROW,
                      "Health and configuration"}


@asynccontextmanager
async def prometheus_scraping(target: str, tmp_path: Path) -> AsyncIterator[str]:
    assert PROMETHEUS is not None
    config = tmp_path / "prometheus.yml"
    scrape = {"job_name": "proxykit", "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]}))  # YAML
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_up(f"{url}/-/ready", process, log_path, timeout=30)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


async def drive_mixed_traffic(client: httpx.AsyncClient) -> None:
    hello = [{"role": "user", "content": "hello"}]
    for _ in range(8):  # bounded: a few seconds of traffic, so rates have several scrapes
        await client.post("/v1/chat/completions", json={"model": "demo-chat", "messages": hello})
        await client.post("/v1/chat/completions", json={"model": "demo-reasoner", "messages": hello, "stream": True})
        await client.post("/v1/chat/completions", json={"model": "demo-flaky", "messages": hello})  # a 429 key
        await client.post("/v1/embeddings", json={"model": "demo-embed", "input": "x"})
        await client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": hello})  # 404
        await client.post("/v1/chat/completions", content=b"not json")  # 400
        await anyio.sleep(0.5)


# Skipped only off CI: there, a missing Prometheus is a broken .ci/run and must fail.
@pytest.mark.skipif(PROMETHEUS is None and not os.environ.get("CI"), reason="needs Debian's prometheus package")
async def test_every_panel_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    async with proxykit_process(tmp_path, "--demo") as proxy:
        target = proxy.url.removeprefix("http://")
        async with prometheus_scraping(target, tmp_path) as prometheus:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
                await drive_mixed_traffic(client)
                exported = (await client.get("/metrics")).text
            async with httpx.AsyncClient(base_url=prometheus, timeout=30) as api:
                results = await evaluate_until_all_have_data(api, panel_expressions())
    empty = [title for title, expr, result in results if not result]
    assert not empty, f"panels without data: {empty}"
    declared = set(re.findall(r"^# TYPE (\w+)", exported, re.MULTILINE))
    for title, expr, _ in results:
        for name in re.findall(r"proxykit_\w+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in declared or name in declared, f"{title}: {name} is not exported"


async def evaluate_until_all_have_data(
    api: httpx.AsyncClient, expressions: list[tuple[str, str]]
) -> list[tuple[str, str, list[Any]]]:
    with anyio.move_on_after(30):  # until the last scrapes are in; then report what is empty
        while True:
            results = [(title, expr, await query(api, expr)) for title, expr in expressions]
            if all(result for _, _, result in results):
                break
            await anyio.sleep(1)
    return results


async def query(api: httpx.AsyncClient, expr: str) -> list[Any]:
    response = await api.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[Any] = body["data"]["result"]
    return result


@pytest.mark.skipif(PROMETHEUS is None and not os.environ.get("CI"), reason="needs Debian's prometheus package")
async def test_the_budget_and_store_row_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    capped = "pk-dashboard-capped-1111"
    async with serve(DemoUpstream(), lifespan="off") as upstream_url:
        config = demo_config(f"{upstream_url}/v1")
        config["auth"] = {"keys": [{"name": "capped", "key": capped, "budget": {"max_usd": 2e-5, "period": "day"}}]}
        config["store"] = {"url": f"sqlite:///{tmp_path / 'usage.db'}"}
        path = tmp_path / "proxykit.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        async with proxykit_process(tmp_path, "--config", str(path)) as proxy:
            async with prometheus_scraping(proxy.url.removeprefix("http://"), tmp_path) as prometheus:
                headers = {"authorization": f"Bearer {capped}"}
                async with httpx.AsyncClient(base_url=proxy.url, headers=headers, timeout=30) as client:
                    hello = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}
                    statuses = set()
                    for _ in range(12):  # bounded: the budget runs out after a few, then 429s
                        statuses.add((await client.post("/v1/chat/completions", json=hello)).status_code)
                        await anyio.sleep(0.3)
                async with httpx.AsyncClient(base_url=prometheus, timeout=30) as api:
                    results = await evaluate_until_all_have_data(api, panel_expressions(store_row=True))
    assert statuses == {200, 429}
    assert len(results) == 5
    empty = [title for title, expr, result in results if not result]
    assert not empty, f"panels without data: {empty}"
