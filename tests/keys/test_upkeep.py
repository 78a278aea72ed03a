"""Set-aside keys come back through a free probe; key files are re-read on change or SIGHUP."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from proxykit import KeyPool, config_from_dict, create_app
from proxykit.keys.upkeep import PoolUpkeep
from tests.conftest import CHAT, proxykit_process, serve
from tests.keyed_upstream import KeyedUpstream

pytestmark = pytest.mark.anyio

BAD, GOOD = "sk-probe-secret-bad", "sk-probe-secret-good"


async def ready_counts(client: httpx.AsyncClient, deployment: str = "chat") -> dict[str, Any]:
    counts: dict[str, Any] = (await client.get("/health/ready")).json()["models"]["chat"]["deployments"][deployment]
    return counts


async def wait_for(client: httpx.AsyncClient, **expected: int) -> dict[str, Any]:
    with anyio.fail_after(10):  # the upkeep loop runs every second
        while True:
            counts = await ready_counts(client)
            if all(counts[name] == value for name, value in expected.items()):
                return counts
            await anyio.sleep(0.1)


def config_for(url: str, api_keys: Any, **overrides: Any) -> dict[str, Any]:
    return {"models": [{"name": "chat", "deployments": [{"base_url": f"{url}/v1", "api_keys": api_keys}]}],
            "retry": {"backoff": {"initial": 0, "max": 0}}, **overrides}


async def test_set_aside_key_returns_after_a_successful_probe() -> None:
    upstream = KeyedUpstream({BAD: "401", GOOD: "ok"})
    async with serve(upstream, lifespan="off") as upstream_url:
        config = config_for(upstream_url, [BAD, GOOD], cooldown={"on_auth_error": 0.2})
        async with serve(create_app(config)) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert (await ready_counts(client))["set_aside"] == 1
            upstream.behaviours[BAD] = "ok"  # the provider fixed the key
            await wait_for(client, set_aside=0, available=2)
            completions_before = len(upstream.models)
            for _ in range(4):
                await client.post("/v1/chat/completions", json=CHAT)
    # One completion, one probe (GET /v1/models, not billed), then completions again.
    assert upstream.calls[BAD] >= 3
    assert len(upstream.models) == completions_before + 4


async def test_key_that_fails_its_probe_stays_set_aside() -> None:
    upstream = KeyedUpstream({BAD: "401", GOOD: "ok"})
    async with serve(upstream, lifespan="off") as upstream_url:
        config = config_for(upstream_url, [BAD, GOOD], cooldown={"on_auth_error": 0.2})
        async with serve(create_app(config)) as url, httpx.AsyncClient(base_url=url) as client:
            await client.post("/v1/chat/completions", json=CHAT)
            with anyio.fail_after(10):
                while upstream.calls[BAD] < 2:  # the probe came
                    await anyio.sleep(0.05)
            counts = await ready_counts(client)
    assert counts["set_aside"] == 1
    assert upstream.models.count("chat") == 2  # completions: one on each key, none after


def write_keys(path: Path, keys: list[str], *, mtime: float) -> None:
    path.write_text("\n".join(keys) + "\n")
    os.utime(path, (mtime, mtime))


async def test_changed_key_file_is_read_again_keeping_the_state_of_keys_that_stay(tmp_path: Path) -> None:
    upstream = KeyedUpstream({"sk-file-1": "429", "sk-file-2": "ok", "sk-file-3": "ok", "sk-file-4": "ok"})
    keys_file = tmp_path / "keys.txt"
    write_keys(keys_file, ["sk-file-1", "sk-file-2"], mtime=1_000_000)
    async with serve(upstream, lifespan="off") as upstream_url:
        config_path = tmp_path / "proxykit.yaml"
        config_path.write_text(yaml.safe_dump(config_for(upstream_url, "file:keys.txt",
                                                         routing={"strategy": "round-robin"})))
        async with serve(create_app(config_path)) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200  # sk-file-1 rests
            write_keys(keys_file, ["sk-file-1", "sk-file-3", "sk-file-4"], mtime=1_000_010)
            counts = await wait_for(client, available=2, resting=1)
            for _ in range(6):
                assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert counts["reasons"] == {"429": 1}  # sk-file-1 kept its rest across the reload
    assert upstream.calls["sk-file-1"] == 1
    assert upstream.calls["sk-file-2"] == 1  # removed: only the retry of the first request used it
    assert upstream.calls["sk-file-3"] == upstream.calls["sk-file-4"] == 3


async def test_sighup_makes_proxykit_serve_read_key_files_again(tmp_path: Path) -> None:
    upstream = KeyedUpstream({})
    keys_file = tmp_path / "keys.txt"
    write_keys(keys_file, ["sk-hup-1"], mtime=1_000_000)
    async with serve(upstream, lifespan="off") as upstream_url:
        config_path = tmp_path / "proxykit.yaml"
        config_path.write_text(yaml.safe_dump(config_for(upstream_url, "file:keys.txt")))
        async with proxykit_process(tmp_path, "--config", str(config_path)) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                write_keys(keys_file, ["sk-hup-1", "sk-hup-2", "sk-hup-3"], mtime=1_000_000)  # same mtime
                proxy.process.send_signal(signal.SIGHUP)
                counts = await wait_for(client, available=3)
    assert counts["set_aside"] == 0
    assert "sk-hup" not in proxy.output
    assert "re-read the key file of chat: 3 keys (2 new, 0 removed)" in proxy.output


async def test_a_changed_key_file_with_a_key_unfit_for_a_header_keeps_the_old_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    keys_file = tmp_path / "keys.txt"
    write_keys(keys_file, ["sk-file-1", "sk-file-2"], mtime=1_000_000)
    config = config_from_dict(config_for("http://upstream.test", "file:keys.txt"), base_dir=tmp_path)
    pool = KeyPool(config)
    async with httpx.AsyncClient() as client:
        upkeep = PoolUpkeep(pool, client)
        write_keys(keys_file, ["sk-file-3", "sk-secret-\u00e9"], mtime=1_000_010)
        upkeep.reload_changed_files()
    assert sorted(state.secret for state in pool.all_keys()) == ["sk-file-1", "sk-file-2"]
    assert "key 2 of key file" in caplog.text and "keeping its keys" in caplog.text
    assert "sk-secret" not in caplog.text
