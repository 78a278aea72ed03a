"""examples/deploy/: the image's command line runs, and the Kubernetes manifests parse and name
ports, paths and keys that exist. (No container engine here can pull base images: what can be
tested without one is.)"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxykit import create_app
from proxykit.config import config_from_dict
from tests.conftest import proxykit_process

DEPLOY = Path(__file__).parents[1] / "examples" / "deploy"
MANIFESTS = {path.stem: yaml.safe_load(path.read_text()) for path in (DEPLOY / "kubernetes").glob("*.yaml")}


def dockerfile_command() -> list[str]:
    """The image's ENTRYPOINT and CMD, as the container runs them."""
    text = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return [*entrypoint, *command]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def container() -> dict[str, Any]:
    [only] = MANIFESTS["deployment"]["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


@pytest.mark.anyio
async def test_the_images_command_line_serves_then_drains_on_sigterm(tmp_path: Path) -> None:
    command = dockerfile_command()
    assert command[:2] == ["proxykit", "serve"]
    config = tmp_path / "proxykit.yaml"
    config.write_text(json.dumps({"models": [{"name": "m", "deployments": [{"base_url": "http://127.0.0.1:9/v1"}]}]}))
    args = command[2:]
    args[args.index("--config") + 1] = str(config)
    args[args.index("--host") + 1] = "127.0.0.1"  # tests listen on loopback only
    port_at = args.index("--port")
    del args[port_at:port_at + 2]  # proxykit_process picks a free one
    async with proxykit_process(tmp_path, *args) as proxy, httpx.AsyncClient() as client:
        assert (await client.get(f"{proxy.url}/health/ready")).status_code == 200
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=20) == 0
    assert json.loads(proxy.output.splitlines()[0])["level"]  # --log-format json: objects from the first line


def test_probes_and_ports_name_what_proxykit_serves() -> None:
    spec = container()
    app = create_app(config_from_dict({"models": [{"name": "m", "deployments": [{"base_url": "http://x/v1"}]}]}))
    routes = {getattr(route, "path", None) for route in app.routes}
    assert spec["livenessProbe"]["httpGet"]["path"] == "/health" in routes
    assert spec["readinessProbe"]["httpGet"]["path"] == "/health/ready" in routes
    [port] = spec["ports"]
    assert str(port["containerPort"]) == option(spec["args"], "--port") == option(dockerfile_command(), "--port")
    assert MANIFESTS["service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert spec["args"] == dockerfile_command()[2:]  # the manifest runs what the image runs


def test_the_grace_period_outlasts_the_drain() -> None:
    pod = MANIFESTS["deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > float(option(container()["args"], "--timeout-graceful-shutdown"))


def test_the_configmap_is_a_valid_config_with_the_secrets_keys(tmp_path: Path) -> None:
    secret = MANIFESTS["secret"]["stringData"]
    keys = tmp_path / "provider.txt"
    keys.write_text(secret["provider.txt"])
    text = MANIFESTS["configmap"]["data"]["proxykit.yaml"].replace("/etc/proxykit-keys/provider.txt", str(keys))
    environ = {name: secret[name] for name in ("TEAM_A_KEY", "STORE_URL")}
    config = config_from_dict(yaml.safe_load(text), environ=environ)
    assert len(config.models[0].deployments[0].api_keys) == 2
    assert config.store.url.startswith("postgresql://")  # two replicas: one shared store
    env = {entry["name"] for entry in container()["env"]}
    assert env == set(environ)
    mounts = {mount["name"]: mount["mountPath"] for mount in container()["volumeMounts"]}
    assert mounts["config"] == str(Path(option(container()["args"], "--config")).parent)
    assert f"{mounts['keys']}/provider.txt" == "/etc/proxykit-keys/provider.txt"


def test_labels_selectors_and_names_agree() -> None:
    labels = MANIFESTS["deployment"]["spec"]["template"]["metadata"]["labels"]
    for manifest in ("service", "pdb"):
        selector = MANIFESTS[manifest]["spec"]["selector"]
        assert selector.get("matchLabels", selector).items() <= labels.items()
    volumes = {volume["name"]: volume for volume in MANIFESTS["deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == MANIFESTS["configmap"]["metadata"]["name"]
    assert volumes["keys"]["secret"]["secretName"] == MANIFESTS["secret"]["metadata"]["name"]


def test_compose_builds_the_image() -> None:
    compose = yaml.safe_load((Path(__file__).parents[1] / "grafana" / "docker-compose.yml").read_text())
    build = compose["services"]["proxykit"]["build"]
    assert (Path(__file__).parents[1] / "grafana" / build["context"] / build["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile").resolve()
