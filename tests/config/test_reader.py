"""load_config(): YAML into typed frozen dataclasses, every problem named by its field path."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

import proxykit.config.model
from proxykit import Config, ConfigError, config_from_dict, load_config

FULL = """
auth:
  keys:
    - name: team-a
      key: ${TEAM_A_KEY}
      rpm: 600
      models: ["deepseek-ai/*", "gemini-2.5-flash"]
models:
  - name: deepseek-ai/DeepSeek-V3
    deployments:
      - base_url: https://upstream.example/v1/
        name: siliconflow
        api_keys: ${PROVIDER_KEYS}
        rpm: 1000
        max_tokens: 8192
      - base_url: https://other.example/v1
        model: deepseek-v3
        api_keys: file:keys.txt
    fallbacks: [gemini-2.5-flash]
    pricing: {input_per_1m: 0.27, output_per_1m: 1.10}
  - name: gemini-2.5-flash
    deployments:
      - base_url: https://gemini.example/v1
        api_keys:
          - {name: primary, key: g-key-1}
          - g-key-2
routing: {strategy: round-robin}
timeouts: {first_byte: 30}
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "keys.txt").write_text("# pool of keys\nfile-key-1\n\nfile-key-2\nfile-key-3\n")
    path = tmp_path / "proxykit.yaml"
    path.write_text(FULL)
    monkeypatch.setenv("TEAM_A_KEY", "team-a-secret")
    monkeypatch.setenv("PROVIDER_KEYS", "env-key-1, env-key-2")
    return path


def test_full_config_is_read_into_typed_values(config_file: Path) -> None:
    config = load_config(config_file)
    deepseek, gemini = config.models
    first, second = deepseek.deployments
    assert first.name == "siliconflow"
    assert first.base_url == "https://upstream.example/v1"
    assert first.model == "deepseek-ai/DeepSeek-V3"
    assert [key.secret for key in first.api_keys] == ["env-key-1", "env-key-2"]
    assert [key.alias for key in first.api_keys] == ["siliconflow#0", "siliconflow#1"]
    assert (first.rpm, first.max_tokens, first.weight) == (1000, 8192, 1.0)
    assert second.name == "deepseek-ai/DeepSeek-V3@1"
    assert second.model == "deepseek-v3"
    assert [key.secret for key in second.api_keys] == ["file-key-1", "file-key-2", "file-key-3"]
    assert second.keys_file == str(config_file.parent / "keys.txt")
    assert [key.alias for key in gemini.deployments[0].api_keys] == ["primary", "gemini-2.5-flash#1"]
    assert deepseek.fallbacks == ("gemini-2.5-flash",)
    assert deepseek.pricing is not None and deepseek.pricing.output_per_1m == 1.10
    assert config.auth.keys[0].key == "team-a-secret"
    assert config.auth.keys[0].models == ("deepseek-ai/*", "gemini-2.5-flash")
    assert config.routing.strategy == "round-robin"
    assert (config.timeouts.first_byte, config.timeouts.connect, config.timeouts.read) == (30.0, 5.0, 300.0)


def test_defaults_match_the_contract() -> None:
    config = config_from_dict({"models": [{"name": "m", "deployments": [{"base_url": "http://x/v1"}]}]})
    assert not config.auth.enabled
    assert config.routing.strategy == "usage-based"
    assert config.retry.attempts == 3
    assert config.retry.retry_on == (429, 500, 502, 503, 504, "connect_error", "timeout")
    assert (config.cooldown.on_429, config.cooldown.on_auth_error) == (60.0, 3600.0)
    assert (config.limits.max_body_bytes, config.limits.backend) == (20_000_000, "memory")
    assert config.metrics.path == "/metrics" and config.metrics.enabled


def test_values_are_frozen_and_secrets_stay_out_of_repr(config_file: Path) -> None:
    config = load_config(config_file)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models[0].name = "other"  # type: ignore[misc]
    text = repr(config)
    for secret in ("team-a-secret", "env-key-1", "file-key-2", "g-key-1"):
        assert secret not in text


def test_every_problem_is_reported_with_its_field_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("""
models:
  - name: a
    deployments:
      - base_url: ftp://nope
        api_keys: []
        rpm: -1
    fallbacks: [ghost]
  - name: b
    deployments: []
  - deployments: [{base_url: "http://x/v1"}]
routing: {strategy: fastest}
retry: {attempts: many, retry_on: [200]}
limits: {backend: etcd}
timeouts: {first_byt: 10}
""")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = "\n".join(caught.value.problems)
    for expected in (
        "models[0].deployments[0].base_url: must be an http:// or https:// URL",
        "models[0].deployments[0].api_keys: holds no keys",
        "models[0].deployments[0].rpm: must be at least 1",
        "models[0].fallbacks: names unknown model 'ghost'",
        "models[1].deployments: must be a non-empty list",
        "models[2].name: is required",
        "routing.strategy: must be one of",
        "retry.attempts: must be a number",
        "retry.retry_on:",
        "limits.backend: must be one of",
        "timeouts.first_byt: unknown field",
    ):
        assert expected in problems


def test_missing_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    data = {"models": [{"name": "m", "deployments": [{"base_url": "http://x/v1", "api_keys": "${NOT_SET_ANYWHERE}"}]}]}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    expected = "models[0].deployments[0].api_keys: environment variable NOT_SET_ANYWHERE is not set"
    assert expected in caught.value.problems


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("", "config: is empty", id="empty"),
        pytest.param("- a\n- b\n", "config: must be a mapping", id="a-list"),
        pytest.param("models: [\n", "not valid YAML at line", id="broken-yaml"),
    ],
)
def test_unusable_files_are_config_errors(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert problem in str(caught.value)


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    data = {"models": [{"name": "m", "deployments": [{"base_url": "http://x/v1", "api_keys": "file:nope.txt"}]}]}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, base_dir=tmp_path)
    assert "models[0].deployments[0].api_keys: cannot read key file" in str(caught.value)


def test_upstream_keys_that_cannot_go_in_a_header_are_refused_without_being_shown(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("sk-fine\nsk-bad\u00e9key\n")
    data = {"models": [{"name": "m", "deployments": [
        {"base_url": "http://x/v1", "api_keys": ["sk-one", "sk-line\tbreak"]},
        {"base_url": "http://y/v1", "api_keys": "file:keys.txt"},
    ]}]}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, base_dir=tmp_path)
    problems = "\n".join(caught.value.problems)
    assert "models[0].deployments[0].api_keys[1]: must be printable ASCII" in problems
    assert "models[0].deployments[1].api_keys: key 2 of key file" in problems
    assert "break" not in str(caught.value) and "key\n" not in str(caught.value) and "sk-bad" not in str(caught.value)


def test_duplicate_names_are_refused() -> None:
    deployment = {"base_url": "http://x/v1", "name": "same"}
    data = {"models": [{"name": "m", "deployments": [deployment]}, {"name": "m", "deployments": [deployment]}],
            "auth": {"keys": [{"name": "a", "key": "k"}, {"name": "a", "key": "k"}]}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    problems = "\n".join(caught.value.problems)
    assert "models[1].name: model 'm' is defined twice" in problems
    assert "deployment name 'same' is used twice" in problems
    assert "auth.keys: key names must be unique" in problems
    assert "two clients share the same key" in problems
    assert "'k'" not in problems  # the duplicated key itself is never printed


def test_internal_fields_are_not_config() -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"_by_name": {}, "models": [{"name": "m", "deployments": [{"base_url": "http://x/v1"}]}]})
    assert any("_by_name" in problem for problem in raised.value.problems)


REFERENCE = Path(__file__).parents[2] / "examples" / "reference.yaml"
# Set by proxykit, not read from a file.
INTERNAL_FIELDS = {"keys_file", "alias", "secret"}


def config_fields(cls: type, seen: set[type] | None = None) -> set[str]:
    """Every field name of a config dataclass and of those it holds, recursively."""
    seen = seen if seen is not None else set()
    seen.add(cls)
    names = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.name in INTERNAL_FIELDS:
            continue
        names.add(field.name)
        for inner in re.findall(r"[A-Za-z]+", str(hints[field.name])):
            inner_cls = getattr(proxykit.config.model, inner, None)
            if dataclasses.is_dataclass(inner_cls) and isinstance(inner_cls, type) and inner_cls not in seen:
                names |= config_fields(inner_cls, seen)
    return names


def test_the_reference_config_names_every_field_and_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    text = REFERENCE.read_text()
    fields = config_fields(Config)
    assert {"strategy", "auth_header", "input_per_1m", "require_key", "queue_timeout"} <= fields  # walked deep
    missing = {name for name in fields if not re.search(rf"^\s*(- )?{name}:", text, re.MULTILINE)}
    assert not missing, f"examples/reference.yaml lacks {sorted(missing)}"
    monkeypatch.setenv("TEAM_A_KEY", "a")
    monkeypatch.setenv("PROVIDER_KEYS", "k1,k2")
    load_config(REFERENCE)
