"""The command line: `check`, `serve` refusing bad configs, and `serve --demo`."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.types import Receive, Scope, Send

import proxykit
from proxykit import config_from_dict
from proxykit.cli import warn_if_open
from tests.conftest import free_port, make_config, proxykit_process, serve, with_auth

SECRETS = ("sk-pool-secret-1", "sk-pool-secret-2", "team-secret-key")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxykit", *args], capture_output=True, text=True, timeout=60, env=env,
    )


def test_check_summarises_without_printing_keys(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("sk-pool-secret-1\nsk-pool-secret-2\n")
    (tmp_path / "c.yaml").write_text("""
auth: {keys: [{name: team, key: team-secret-key}]}
models:
  - name: big
    deployments:
      - {base_url: "https://user:pw@api.example/v1", api_keys: "file:keys.txt"}
      - {base_url: "http://local:8000/v1", name: local}
""")
    result = run("check", str(tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr
    assert "1 models, 2 deployments, 2 upstream keys, 1 client keys (auth on)" in result.stdout  # keyless: none
    assert "deployment big@0: https://api.example/v1 model=big, 2 keys from a file" in result.stdout
    assert "deployment local: http://local:8000/v1 model=big, no key" in result.stdout
    for secret in (*SECRETS, "pw@"):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("command", [["check"], ["serve", "--config"]], ids=["check", "serve"])
def test_bad_config_exits_2_naming_each_field(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - name: m\n    deployments: [{base_url: nope}]\nretry: {attempts: -1}\n")
    result = run(*command, str(path), "--port", "1") if command[0] == "serve" else run(*command, str(path))
    assert result.returncode == 2
    assert "models[0].deployments[0].base_url: must be an http:// or https:// URL" in result.stderr
    assert "retry.attempts: must be at least 0" in result.stderr
    assert "Uvicorn running" not in result.stderr


def test_serve_without_a_config_exits_2() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = run("serve", env=env)
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read the file" in result.stderr


@pytest.mark.parametrize(
    ("host", "auth", "warns"),
    [
        pytest.param("0.0.0.0", False, True, id="open-without-auth"),
        pytest.param("10.1.2.3", False, True, id="lan-without-auth"),
        pytest.param("127.0.0.1", False, False, id="loopback"),
        pytest.param("localhost", False, False, id="localhost"),
        pytest.param("::1", False, False, id="ipv6-loopback"),
        pytest.param("0.0.0.0", True, False, id="open-with-auth"),
    ],
)
def test_warns_when_an_open_proxy_listens_beyond_loopback(
    host: str, auth: bool, warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_from_dict(with_auth(make_config()) if auth else make_config())
    with caplog.at_level(logging.WARNING, logger="proxykit"):
        assert warn_if_open(config, host) is warns
    assert bool([r for r in caplog.records if "auth is off" in r.getMessage()]) is warns


@pytest.mark.anyio
async def test_demo_serves_streams_and_prints_a_curl_line(tmp_path: Path) -> None:
    async with proxykit_process(tmp_path, "--demo") as proxy, httpx.AsyncClient() as client:
        plain = await client.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "demo-chat", "messages": [{"role": "user", "content": "Hello"}]})
        events = []
        async with client.stream("POST", f"{proxy.url}/v1/chat/completions", json={
            "model": "demo-reasoner", "stream": True, "messages": [{"role": "user", "content": "Hello"}],
        }) as response:
            async for chunk in response.aiter_raw():
                events.append(chunk)
    assert plain.status_code == 200
    assert plain.json()["choices"][0]["message"]["content"].endswith("You said: Hello")
    assert events[-1] == b"data: [DONE]\n\n"
    assert len(events) > 5  # one read per event: the demo really streams
    first = json.loads(events[1].removeprefix(b"data: "))
    assert "reasoning_content" in first["choices"][0]["delta"]
    assert "curl -N http://127.0.0.1:" in proxy.output
    assert "demo-upstream-key" not in proxy.output
    assert proxy.output.count("Uvicorn running on") == 1  # the demo upstream starts quietly
    assert proxy.output.count("Started server process") == 1
    assert "ready: taking requests at http://127.0.0.1:" in proxy.output


@pytest.mark.anyio
async def test_the_demo_shows_usage_after_a_few_requests_and_leaves_no_file(tmp_path: Path) -> None:
    async with proxykit_process(tmp_path, "--demo") as proxy, httpx.AsyncClient(base_url=proxy.url) as client:
        for model in ("demo-chat", "demo-chat", "demo-reasoner"):
            await client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user",
                                                                                        "content": "Hi"}]})
        usage = (await client.get("/api/llm/stats/usage")).json()
        rows = (await client.get("/api/llm/requests", params={"limit": 2})).json()["requests"]
    assert usage["total_requests"] == 3 and usage["by_model"]["demo-chat"]["requests"] == 2
    assert usage["total_cost"] > 0 and len(rows) == 2
    assert "/api/llm/stats/usage" in proxy.output  # the banner says where to look
    assert not list(tmp_path.glob("*.db"))  # the demo's store is in memory


def test_sample_config_in_examples_is_valid() -> None:
    import os

    env = {**os.environ, "TEAM_A_KEY": "a", "TEAM_B_KEY": "b", "OPENAI_KEYS": "k1,k2"}
    result = run("check", str(Path(__file__).parents[1] / "examples" / "proxykit.yaml"), env=env)
    assert result.returncode == 0, result.stderr
    assert "3 models, 4 deployments" in result.stdout


def test_check_never_prints_a_query_value_of_a_base_url(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("""
models:
  - name: gemini
    deployments:
      - {base_url: "https://gen.example/v1beta/openai?key=SECRET-IN-QUERY&alt=sse", api_keys: [k-123456789]}
      - {base_url: "http://me:PASSWORD@local:8000/v1", name: local, proxy: "http://u:PROXY-PASS@proxy:3128"}
""")
    result = run("check", str(tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr
    assert "https://gen.example/v1beta/openai?key=***&alt=***" in result.stdout
    for secret in ("SECRET-IN-QUERY", "PASSWORD", "PROXY-PASS", "k-123456789"):
        assert secret not in result.stdout + result.stderr


def test_a_proxy_that_is_not_http_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("""
models:
  - name: m
    deployments: [{base_url: "https://api.example/v1", proxy: "socks5://u:SECRET@proxy:1080"}]
""")
    result = run("check", str(tmp_path / "c.yaml"))
    assert result.returncode == 2
    assert "models[0].deployments[0].proxy: only http:// proxies are supported, not socks5://" in result.stderr
    assert "SECRET" not in result.stderr


def test_version_prints_the_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"proxykit {proxykit.__version__}"


def test_a_port_in_use_is_one_line_and_exit_3() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--demo", "--port", str(port))
    assert result.returncode == 3
    assert result.stderr.strip() == f"proxykit: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "curl" not in result.stdout  # nothing announced that will not serve


def test_check_warns_of_a_base_url_without_a_version_path_and_counts_keyless_deployments(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("""
models:
  - name: local
    deployments: [{base_url: "http://127.0.0.1:8000"}]
""")
    result = run("check", str(tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr
    assert "1 models, 1 deployments, 0 upstream keys" in result.stdout
    assert "deployment local: http://127.0.0.1:8000 model=local, no key" in result.stdout
    assert "warning: the base_url has no version path" in result.stdout


@pytest.mark.anyio
async def test_json_logs_are_one_object_a_line_with_the_access_fields(tmp_path: Path) -> None:
    async with proxykit_process(tmp_path, "--demo", "--log-format", "json") as proxy, httpx.AsyncClient() as client:
        response = await client.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "demo-chat", "messages": [{"role": "user", "content": "Hello"}]})
        unknown = await client.post(f"{proxy.url}/v1/chat/completions", json={"model": "no-such-model"})
    lines = [json.loads(line) for line in proxy.output.splitlines() if line.strip()]  # every line parses
    access = [entry for entry in lines if entry["logger"] == "proxykit.access"]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(entry["logger"].startswith("uvicorn") for entry in lines)  # uvicorn's own lines too
    served = next(entry for entry in access if entry["request_id"] == response.headers["x-request-id"])
    assert (served["model"], served["status"], served["client"]) == ("demo-chat", 200, "anonymous")
    missed = next(entry for entry in access if entry["request_id"] == unknown.headers["x-request-id"])
    assert missed["model"] == "unknown(asked 'no-such-model')"
    assert "models you may use: demo-chat" in unknown.json()["error"]["message"]


@pytest.mark.anyio
async def test_check_probe_asks_each_deployment_for_its_models(tmp_path: Path) -> None:
    async def lists_models(scope: Scope, receive: Receive, send: Send) -> None:
        good = dict(scope["headers"]).get(b"authorization") == b"Bearer sk-probe-good"
        body = b'{"object": "list", "data": [{"id": "m"}]}' if good else b'{"error": {"message": "bad key"}}'
        status = 404 if not scope["path"].startswith("/v1/") else 200 if good else 401
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async with serve(lists_models, lifespan="off") as url:
        (tmp_path / "c.yaml").write_text(json.dumps({"models": [{"name": "m", "deployments": [
            {"base_url": f"{url}/v1", "name": "good", "api_keys": ["sk-probe-good"]},
            {"base_url": f"{url}/v1", "name": "refused", "api_keys": ["sk-probe-bad-1"]},
            {"base_url": url, "name": "no-version", "api_keys": ["sk-probe-good"]},
            {"base_url": f"http://127.0.0.1:{free_port()}/v1", "name": "down"},
        ]}]}))
        result = await anyio.to_thread.run_sync(lambda: run("check", str(tmp_path / "c.yaml"), "--probe"))
    assert result.returncode == 1, result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if line.startswith("probe ")}
    assert "200 OK, 1 models; it lists 'm'" in lines["probe good"]
    assert "401: the key was refused" in lines["probe refused"]
    assert "404: nothing there: does base_url end in the API version" in lines["probe no-version"]
    assert "unreachable (ConnectError)" in lines["probe down"]
    assert "sk-probe" not in result.stdout + result.stderr
