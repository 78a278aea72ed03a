"""Reading a config: YAML or a dict in, a validated `Config` out (CONTRACT section 3).

    config = load_config("proxykit.yaml")
    config = config_from_dict({"models": [...]})

Every problem in a file is collected with its field path, then raised together as one
`ConfigError`, so a user fixes a file in one go instead of one error a run. `${VAR}` is replaced
from the environment, and `file:PATH` key lists are read here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from proxykit.config.accounts import AccountFields
from proxykit.config.fields import fits_a_header
from proxykit.config.model import (
    AUTH_HEADERS,
    CACHE_BACKENDS,
    LIMIT_BACKENDS,
    RETRY_REASONS,
    ROUTING_STRATEGIES,
    BackoffConfig,
    CacheConfig,
    Config,
    ConfigError,
    CooldownConfig,
    Deployment,
    HealthConfig,
    LimitsConfig,
    MetricsConfig,
    ModelConfig,
    Pricing,
    RetryConfig,
    RoutingConfig,
    TimeoutConfig,
    UpstreamKey,
)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; raises `ConfigError` naming every bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file ({exc.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return config_from_dict(data, base_dir=path.parent)


def config_from_dict(
    data: Any, *, base_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Validate an already-parsed config; `file:` key lists are relative to `base_dir`."""
    reader = _Reader(base_dir or Path.cwd(), os.environ if environ is None else environ)
    config = reader.config(data)
    if reader.problems or config is None:
        raise ConfigError(reader.problems or ["config: empty"])
    return config


class _Reader(AccountFields):
    """Turns plain YAML data into the config's dataclasses, section by section."""

    def __init__(self, base_dir: Path, environ: Mapping[str, str]) -> None:
        super().__init__(environ)
        self.base_dir = base_dir

    def config(self, data: Any) -> Config | None:
        if not isinstance(data, dict):
            self.fail("config", "is empty" if data is None else "must be a mapping with a models list")
            return None
        top = self.mapping(data, "", tuple(f.name for f in fields(Config) if f.init))  # not `_by_name`
        models = self.models(top.get("models"))
        config = Config(
            models=models,
            auth=self.auth(top.get("auth")),
            routing=RoutingConfig(
                strategy=self.choice(
                    self.mapping(top.get("routing"), "routing", ("strategy",)).get("strategy"),
                    "routing.strategy", ROUTING_STRATEGIES, "usage-based",
                )
            ),
            health=self.section(top, "health", HealthConfig, {
                "interval": float, "failure_threshold": int, "recovery_threshold": int,
            }),
            retry=self.retry(top.get("retry")),
            cooldown=self.section(top, "cooldown", CooldownConfig, {
                "on_429": float, "on_auth_error": float, "after_failures": int, "seconds": float,
            }),
            timeouts=self.section(top, "timeouts", TimeoutConfig, {
                "connect": float, "first_byte": float, "read": float,
            }),
            limits=self.limits(top.get("limits")),
            metrics=self.metrics(top.get("metrics")),
            cache=self.cache(top.get("cache")),
            store=self.store(top.get("store")),
            management=self.management(top.get("management")),
        )
        self.check_fallbacks(config)
        self.check_budgets(config)
        return config

    def models(self, raw: Any) -> tuple[ModelConfig, ...]:
        if not isinstance(raw, list) or not raw:
            self.fail("models", "must be a non-empty list of models")
            return ()
        models: list[ModelConfig] = []
        seen_models: set[str] = set()
        seen_deployments: set[str] = set()
        for i, item in enumerate(raw):
            path = f"models[{i}]"
            entry = self.mapping(item, path, ("name", "deployments", "fallbacks", "pricing", "priority", "enabled",
                                              "defaults", "rate_limit"))
            name = self.string(entry.get("name"), f"{path}.name", required=True)
            if name is None:
                continue
            if name in seen_models:
                self.fail(f"{path}.name", f"model {name!r} is defined twice")
            seen_models.add(name)
            deployments = self.deployments(entry.get("deployments"), name, path)
            for deployment in deployments:
                if deployment.name in seen_deployments:
                    self.fail(f"{path}.deployments", f"deployment name {deployment.name!r} is used twice")
                seen_deployments.add(deployment.name)
            models.append(ModelConfig(
                name=name,
                deployments=deployments,
                fallbacks=self.string_list(entry.get("fallbacks"), f"{path}.fallbacks"),
                pricing=self.pricing(entry.get("pricing"), f"{path}.pricing"),
                priority=self.number(entry.get("priority", 0), f"{path}.priority", int, minimum=-(10**6)) or 0,
                enabled=self.boolean(entry.get("enabled"), f"{path}.enabled", True),
                defaults=self.defaults(entry.get("defaults"), f"{path}.defaults"),
                **self.model_limits(entry.get("rate_limit"), f"{path}.rate_limit"),
            ))
        return tuple(models)

    def deployments(self, raw: Any, model: str, model_path: str) -> tuple[Deployment, ...]:
        if not isinstance(raw, list) or not raw:
            self.fail(f"{model_path}.deployments", "must be a non-empty list")
            return ()
        result = []
        allowed = ("base_url", "name", "model", "api_keys", "rpm", "tpm", "weight", "max_tokens", "proxy",
                   "auth_header", "headers", "priority")
        for j, item in enumerate(raw):
            path = f"{model_path}.deployments[{j}]"
            entry = self.mapping(item, path, allowed)
            base_url = self.string(entry.get("base_url"), f"{path}.base_url", required=True)
            if base_url is not None and not re.match(r"^https?://[^/\s]+", base_url):
                self.fail(f"{path}.base_url", "must be an http:// or https:// URL")
            name = self.string(entry.get("name"), f"{path}.name") or (model if len(raw) == 1 else f"{model}@{j}")
            keys, keys_file = self.api_keys(entry.get("api_keys"), f"{path}.api_keys", name)
            optional = {
                key: self.number(entry[key], f"{path}.{key}", int, minimum=1)
                for key in ("rpm", "tpm", "max_tokens") if entry.get(key) is not None
            }
            weight = self.number(entry.get("weight", 1.0), f"{path}.weight", float)
            proxy = self.proxy(entry.get("proxy"), f"{path}.proxy")
            auth_header = self.choice(entry.get("auth_header"), f"{path}.auth_header", AUTH_HEADERS, "authorization")
            headers = self.static_headers(entry.get("headers"), f"{path}.headers")
            result.append(Deployment(
                name=name,
                base_url=(base_url or "").rstrip("/"),
                model=self.string(entry.get("model"), f"{path}.model") or model,
                api_keys=keys,
                weight=1.0 if weight is None else weight,
                keys_file=keys_file,
                proxy=proxy,
                auth_header=auth_header,
                headers=headers,
                priority=self.number(entry.get("priority", 0), f"{path}.priority", int, minimum=0) or 0,
                **optional,
            ))
        return tuple(result)

    def api_keys(self, raw: Any, path: str, deployment: str) -> tuple[tuple[UpstreamKey, ...], str | None]:
        """A YAML list, a "k1,k2" string, or "file:PATH" with one key a line; none for a keyless upstream."""
        keys_file = None
        if raw is None:
            return (UpstreamKey(alias=f"{deployment}#0", secret=""),), None
        if isinstance(raw, str):
            text = self.expand(raw, path).strip()
            if text.startswith("file:"):
                keys_file = str(self.base_dir / text[len("file:"):].strip())
                raw = read_key_file(keys_file, self, path)
            else:
                raw = text.split(",")
        if not isinstance(raw, list):
            self.fail(path, "must be a list, a comma-separated string or file:PATH")
            return (), keys_file
        keys: list[UpstreamKey] = []
        for i, item in enumerate(raw):
            alias = f"{deployment}#{i}"
            if isinstance(item, dict):
                entry = self.mapping(item, f"{path}[{i}]", ("name", "key"))
                alias = self.string(entry.get("name"), f"{path}[{i}].name") or alias
                item = entry.get("key")
            secret = self.expand(item, f"{path}[{i}]").strip() if isinstance(item, str) else ""
            if not secret:
                self.fail(f"{path}[{i}]", "must be a non-empty key")
                continue
            if not fits_a_header(secret):
                self.fail(f"{path}[{i}]", "must be printable ASCII (it is sent in a header)")
                continue
            keys.append(UpstreamKey(alias=alias, secret=secret))
        if not keys:
            self.fail(path, "holds no keys")
        aliases = [key.alias for key in keys]
        if len(set(aliases)) != len(aliases):
            self.fail(path, "key names must be unique")
        return tuple(keys), keys_file

    def pricing(self, raw: Any, path: str) -> Pricing | None:
        if raw is None:
            return None
        entry = self.mapping(raw, path, ("input_per_1m", "output_per_1m"))
        prices = {
            key: self.number(entry[key], f"{path}.{key}", float) for key in entry if key in Pricing.__slots__
        }
        return Pricing(**{key: value for key, value in prices.items() if value is not None})

    def retry(self, raw: Any) -> RetryConfig:
        entry = self.mapping(raw, "retry", ("attempts", "backoff", "retry_on"))
        default = RetryConfig()
        attempts = self.number(entry["attempts"], "retry.attempts", int) if "attempts" in entry else None
        backoff_entry = self.mapping(entry.get("backoff"), "retry.backoff", ("initial", "max"))
        backoff = {
            key: self.number(backoff_entry[key], f"retry.backoff.{key}", float) for key in ("initial", "max")
            if backoff_entry.get(key) is not None
        }
        retry_on = default.retry_on
        if entry.get("retry_on") is not None:
            raw_on = entry["retry_on"]
            valid = isinstance(raw_on, list) and all(
                (isinstance(item, int) and 400 <= item <= 599) or item in RETRY_REASONS for item in raw_on
            )
            if valid:
                retry_on = tuple(raw_on)
            else:
                self.fail("retry.retry_on", "must list HTTP statuses 400-599, connect_error or timeout")
        return RetryConfig(
            attempts=default.attempts if attempts is None else attempts,
            backoff=BackoffConfig(**{k: v for k, v in backoff.items() if v is not None}),
            retry_on=retry_on,
        )

    def limits(self, raw: Any) -> LimitsConfig:
        entry = self.mapping(raw, "limits", ("max_body_bytes", "backend", "redis_url", "queue_timeout"))
        size = self.number(entry["max_body_bytes"], "limits.max_body_bytes", int, minimum=1) \
            if entry.get("max_body_bytes") is not None else None
        redis_url = self.string(entry.get("redis_url"), "limits.redis_url")
        limits = LimitsConfig(backend=self.choice(entry.get("backend"), "limits.backend", LIMIT_BACKENDS, "memory"))
        if size:
            limits = replace(limits, max_body_bytes=size)
        if redis_url:
            limits = replace(limits, redis_url=redis_url)
        if entry.get("queue_timeout") is not None:
            queue = self.number(entry["queue_timeout"], "limits.queue_timeout", float)
            limits = limits if queue is None else replace(limits, queue_timeout=queue)
        return limits

    def cache(self, raw: Any) -> CacheConfig:
        entry = self.mapping(raw, "cache", ("enabled", "backend", "ttl", "max_bytes", "shared_between_clients"))
        default = CacheConfig()
        ttl = self.number(entry["ttl"], "cache.ttl", float) if entry.get("ttl") is not None else None
        size = self.number(entry["max_bytes"], "cache.max_bytes", int, minimum=1024) \
            if entry.get("max_bytes") is not None else None
        return CacheConfig(
            enabled=self.boolean(entry.get("enabled"), "cache.enabled", False),
            backend=self.choice(entry.get("backend"), "cache.backend", CACHE_BACKENDS, "memory"),
            ttl=default.ttl if ttl is None else ttl,
            max_bytes=default.max_bytes if size is None else size,
            shared_between_clients=self.boolean(entry.get("shared_between_clients"), "cache.shared_between_clients",
                                                False),
        )

    def metrics(self, raw: Any) -> MetricsConfig:
        entry = self.mapping(raw, "metrics", ("enabled", "path", "require_key"))
        path = self.string(entry.get("path"), "metrics.path") or "/metrics"
        if not path.startswith("/"):
            self.fail("metrics.path", "must start with /")
        return MetricsConfig(
            enabled=self.boolean(entry.get("enabled"), "metrics.enabled", True),
            path=path,
            require_key=self.boolean(entry.get("require_key"), "metrics.require_key", False),
        )

    def check_fallbacks(self, config: Config) -> None:
        names = {model.name for model in config.models}
        for i, model in enumerate(config.models):
            for fallback in model.fallbacks:
                if fallback not in names:
                    self.fail(f"models[{i}].fallbacks", f"names unknown model {fallback!r}")
                elif fallback == model.name:
                    self.fail(f"models[{i}].fallbacks", "a model cannot fall back to itself")


    def check_budgets(self, config: Config) -> None:
        if config.store.enabled:
            return
        for i, key in enumerate(config.auth.keys):
            if key.budget is not None:
                self.fail(f"auth.keys[{i}].budget", "needs a store to keep the spend (store.url is none)")


def read_key_file(path: str, reader: _Reader | None = None, field_path: str = "api_keys") -> list[str]:
    """One key a line; blank lines and lines starting with # are skipped. Without a reader,
    raises OSError or ValueError (a key that cannot go in a header)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        if reader is None:
            raise
        reader.fail(field_path, f"cannot read key file {path} ({exc.strerror})")
        return []
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for number, key in enumerate(keys, 1):
        if not fits_a_header(key):
            message = f"key {number} of key file {path} must be printable ASCII (it is sent in a header)"
            if reader is None:
                raise ValueError(message)
            reader.fail(field_path, message)
            return []
    return keys
