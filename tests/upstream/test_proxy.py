"""Egress proxies (CONTRACT section 3) through a real proxy server, Debian's tinyproxy: plain HTTP
forwarded by the proxy, HTTPS through a CONNECT tunnel to a server whose CA the test makes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme
import uvicorn

from proxykit import create_app
from proxykit.upstream.proxy import ProxyRules
from tests.conftest import CHAT, free_port, serve
from tests.upstreams import Records

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("tinyproxy") is None and not os.environ.get("CI"), reason="no tinyproxy"),
]

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class Tinyproxy:
    def __init__(self, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def seen(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    yield from _tinyproxy(tmp_path, auth=None)


@pytest.fixture
def tinyproxy_with_auth(tmp_path: Path) -> Iterator[Tinyproxy]:
    yield from _tinyproxy(tmp_path, auth=("egress-user", "egress-secret-pw"))


def _tinyproxy(tmp_path: Path, auth: tuple[str, str] | None) -> Iterator[Tinyproxy]:
    port = free_port()
    log = tmp_path / f"tinyproxy-{port}.log"
    conf = tmp_path / f"tinyproxy-{port}.conf"
    lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 30", "Allow 127.0.0.1", "MaxClients 20",
             "LogLevel Connect", f'LogFile "{log}"']
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf.write_text("\n".join(lines) + "\n")
    quiet = subprocess.DEVNULL
    process = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=quiet, stderr=quiet)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"tinyproxy exited: {log.read_text() if log.exists() else ''}") from None
                subprocess.run(["sleep", "0.05"], check=True)
        yield Tinyproxy(port, log)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable of this machine leaks into a test."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def chat_config(base_url: str, **deployment: Any) -> dict[str, Any]:
    return {"models": [{"name": "chat", "deployments": [{"base_url": base_url, **deployment}]}],
            "retry": {"attempts": 0}}


async def ask(app_config: dict[str, Any]) -> httpx.Response:
    # trust_env=False: the test's own client must not use the proxy variables set for proxykit.
    async with serve(create_app(app_config)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
            return await client.post("/v1/chat/completions", json=CHAT)


async def test_http_upstream_through_http_proxy_from_the_environment(
    tinyproxy: Tinyproxy, clean_environment: pytest.MonkeyPatch
) -> None:
    upstream = Records()
    clean_environment.setenv("HTTP_PROXY", tinyproxy.url)
    async with serve(upstream, lifespan="off") as upstream_url:
        response = await ask(chat_config(f"{upstream_url}/v1", api_keys=["sk-upstream-0000"]))
    assert response.status_code == 200
    assert "tinyproxy" in upstream.headers[0].get("via", "")  # the proxy forwarded it
    assert upstream.headers[0]["authorization"] == "Bearer sk-upstream-0000"


@asynccontextmanager
async def tls_upstream(tmp_path: Path, app: Records) -> AsyncIterator[tuple[str, Path]]:
    """A real uvicorn upstream over TLS with a certificate for localhost; yields its URL and CA file."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, ca_file = tmp_path / "server.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                            ssl_certfile=str(cert_file), ssl_keyfile=str(cert_file))
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield f"https://localhost:{port}", ca_file
        finally:
            server.should_exit = True


async def test_https_upstream_through_a_connect_tunnel(
    tinyproxy: Tinyproxy, clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    upstream = Records()
    async with tls_upstream(tmp_path, upstream) as (upstream_url, ca_file):
        clean_environment.setenv("https_proxy", tinyproxy.url)
        clean_environment.setenv("SSL_CERT_FILE", str(ca_file))  # the system store, as a user's CA bundle would
        response = await ask(chat_config(f"{upstream_url}/v1", api_keys=["sk-upstream-0000"]))
    assert response.status_code == 200
    assert tinyproxy.seen("CONNECT localhost:")  # a tunnel: the proxy never saw the request itself
    assert "via" not in upstream.headers[0]
    assert upstream.headers[0]["authorization"] == "Bearer sk-upstream-0000"


async def test_a_tunnel_to_a_server_with_an_untrusted_certificate_fails(
    tinyproxy: Tinyproxy, clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    upstream = Records()
    async with tls_upstream(tmp_path, upstream) as (upstream_url, _):
        clean_environment.setenv("HTTPS_PROXY", tinyproxy.url)
        response = await ask(chat_config(f"{upstream_url}/v1"))
    assert response.status_code == 502  # TLS is verified end to end, through the tunnel
    assert upstream.headers == []


async def test_no_proxy_hosts_go_direct(clean_environment: pytest.MonkeyPatch) -> None:
    upstream = Records()
    clean_environment.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    clean_environment.setenv("NO_PROXY", "example.com,127.0.0.0/8")
    async with serve(upstream, lifespan="off") as upstream_url:
        response = await ask(chat_config(f"{upstream_url}/v1"))
    assert response.status_code == 200
    assert "via" not in upstream.headers[0]


async def test_a_deployment_proxy_with_credentials_wins_over_the_environment(
    tinyproxy_with_auth: Tinyproxy, clean_environment: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = Records()
    clean_environment.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # would fail
    own = tinyproxy_with_auth.url.replace("http://", "http://egress-user:egress-secret-pw@")
    async with serve(upstream, lifespan="off") as upstream_url:
        with_proxy = await ask(chat_config(f"{upstream_url}/v1", proxy=own))
        direct = await ask(chat_config(f"{upstream_url}/v1", proxy="none"))
    assert (with_proxy.status_code, direct.status_code) == (200, 200)
    assert "tinyproxy" in upstream.headers[0].get("via", "")
    assert "via" not in upstream.headers[1]
    assert "proxy-authorization" not in upstream.headers[0]  # for the proxy only
    assert "egress-secret-pw" not in caplog.text


@pytest.mark.parametrize(("environment", "scheme", "host", "expected"), [
    pytest.param({"https_proxy": "http://p:1"}, "https", "api.x", "p", id="https"),
    pytest.param({"HTTPS_PROXY": "http://p:1"}, "https", "api.x", "p", id="https-upper"),
    pytest.param({"https_proxy": "http://p:1"}, "http", "api.x", None, id="https-only-for-https"),
    pytest.param({"all_proxy": "p:1"}, "http", "api.x", "p", id="all-without-scheme"),
    pytest.param({"https_proxy": "http://p:1", "no_proxy": "x"}, "https", "api.x", None, id="no-proxy-suffix"),
    pytest.param({"https_proxy": "http://p:1", "no_proxy": ".x"}, "https", "x", None, id="no-proxy-dot"),
    pytest.param({"https_proxy": "http://p:1", "no_proxy": "ax"}, "https", "api.x", "p", id="no-proxy-not-a-suffix"),
    pytest.param({"https_proxy": "http://p:1", "no_proxy": "*"}, "https", "api.x", None, id="no-proxy-star"),
    pytest.param({"https_proxy": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "https", "10.1.2.3", None, id="cidr"),
    pytest.param({"https_proxy": "http://p:1", "no_proxy": "api.x:443"}, "https", "api.x", None, id="port"),
])
def test_the_environment_is_read_as_curl_reads_it(
    environment: dict[str, str], scheme: str, host: str, expected: str | None
) -> None:
    proxy = ProxyRules.from_environment(environment).proxy_for(scheme, host, f"{scheme}://{host}/v1")
    assert (proxy.host if proxy is not None else None) == expected
