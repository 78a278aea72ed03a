"""`proxykit check --probe`: one unbilled `GET {base_url}/models` per deployment, with one of its
keys, and what came of it, in words a user can act on.

    lines, all_answered = asyncio.run(probe(config))
"""

from __future__ import annotations

import asyncio
import os

import httpx

from proxykit.config import Config, Deployment
from proxykit.resources import proxy_rules
from proxykit.upstream.target import deployment_headers, join_url, printable_url
from proxykit.upstream.transport import Http1Transport

PROBE_TIMEOUT = 10.0


async def probe(config: Config) -> tuple[list[str], bool]:
    """A line per deployment, and whether every one answered 200."""
    transport = Http1Transport(max_connections=64, proxies=proxy_rules(config, os.environ))
    deployments = config.deployments
    async with httpx.AsyncClient(transport=transport, timeout=PROBE_TIMEOUT, trust_env=False) as client:
        results = await asyncio.gather(*(_probe_one(client, deployment) for deployment in deployments))
    return [line for line, _ in results], all(ok for _, ok in results)


async def _probe_one(client: httpx.AsyncClient, deployment: Deployment) -> tuple[str, bool]:
    secret = next((key.secret for key in deployment.api_keys if key.secret), "")
    url = join_url(deployment.base_url, "/models")
    where = f"probe {deployment.name}: GET {printable_url(url)}"
    try:
        response = await client.get(url, headers=deployment_headers(deployment, secret))
    except httpx.TimeoutException:
        return f"{where}: no answer within {PROBE_TIMEOUT:g} s", False
    except httpx.HTTPError as exc:
        return f"{where}: unreachable ({type(exc).__name__})", False
    if response.status_code == 200:
        return f"{where}: 200 OK{_listed(response, deployment.model)}", True
    hint = {
        401: "the key was refused", 403: "the key may not list models",
        404: "nothing there: does base_url end in the API version (such as /v1)?",
    }.get(response.status_code, "")
    return f"{where}: {response.status_code}{': ' + hint if hint else ''}", False


def _listed(response: httpx.Response, model: str) -> str:
    try:
        ids = [entry.get("id") for entry in response.json().get("data", []) if isinstance(entry, dict)]
    except (ValueError, AttributeError):
        return ", but not an OpenAI model list"
    if not ids:
        return ""
    found = "lists" if model in ids else "does not list"
    return f", {len(ids)} models; it {found} {model!r}"
