"""Overrides: changes made through the management API (CONTRACT section 9), kept apart from the
file and laid on top of it, so they survive reloads and restarts and the file stays the operator's.

    patch = patch_of_model(body, file_config, "gpt-x")      # raises ConfigError naming each field
    overrides = Overrides(models={"gpt-x": patch})
    config, warnings = apply_overrides(file_config, overrides)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from proxykit.config.model import ROUTING_STRATEGIES, Config, ConfigError, ModelConfig

MODEL_FIELDS: Final = ("enabled", "priority", "rate_limit", "fallback_models", "parameters")
BALANCING_FIELDS: Final = ("strategy", "health_check_interval", "failure_threshold", "recovery_threshold", "weights")


def key_hash(deployment: str, secret: str) -> str:
    """What an override names a key by: it follows the key (its deployment and secret, as key
    state does) across reloads and moves in its list, and is not the secret."""
    return hashlib.sha256(f"{deployment}\n{secret}".encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Overrides:
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> the fields a PUT named
    balancing: Mapping[str, Any] = field(default_factory=dict)
    keys: Mapping[str, bool] = field(default_factory=dict)  # key hash -> enabled

    def rows(self) -> list[tuple[str, str, str]]:
        """(kind, name, JSON) for the store."""
        return [
            *(("model", name, json.dumps(patch)) for name, patch in self.models.items()),
            *((("balancing", "", json.dumps(self.balancing)),) if self.balancing else ()),
            *(("key", digest, json.dumps(enabled)) for digest, enabled in self.keys.items()),
        ]

    @classmethod
    def from_rows(cls, rows: list[tuple[str, str, str]]) -> Overrides:
        models: dict[str, Any] = {}
        balancing: dict[str, Any] = {}
        keys: dict[str, bool] = {}
        for kind, name, text in rows:
            try:
                value = json.loads(text)
            except ValueError:
                continue  # a row written by hand or cut short: the others still apply
            if kind == "model" and isinstance(value, dict):
                models[name] = value
            elif kind == "balancing" and isinstance(value, dict):
                balancing = value
            elif kind == "key":
                keys[name] = bool(value)
        return cls(models, balancing, keys)


def patch_of_model(body: Any, config: Config, name: str) -> dict[str, Any]:
    """A PUT /config/models/{id} body, checked like the file; raises ConfigError naming the field."""
    entry = _object(body, MODEL_FIELDS)
    problems = []
    for key, value in entry.items():
        if key == "enabled" and not isinstance(value, bool):
            problems.append("enabled: must be true or false")
        elif key == "priority" and not _whole(value, None):
            problems.append("priority: must be a whole number")
        elif key == "rate_limit":
            problems += _rate_limit_problems(value)
        elif key == "fallback_models":
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                problems.append("fallback_models: must be a list of model names")
            else:
                problems += [f"fallback_models: names unknown model {item!r}" for item in value
                             if config.model(item) is None]
                if name in value:
                    problems.append("fallback_models: a model cannot fall back to itself")
        elif key == "parameters" and (not isinstance(value, dict) or {"model", "messages", "stream"} & set(value)):
            problems.append("parameters: must be an object of body members (not model, messages or stream)")
    if problems:
        raise ConfigError(problems)
    return entry


def patch_of_balancing(body: Any, config: Config) -> dict[str, Any]:
    """A PUT /config/load-balancing body; `round_robin` spellings are accepted."""
    entry = _object(body, BALANCING_FIELDS)
    problems = []
    if "strategy" in entry:
        strategy = str(entry["strategy"]).replace("_", "-")
        if strategy not in ROUTING_STRATEGIES:
            problems.append(f"strategy: must be one of: {', '.join(ROUTING_STRATEGIES)}")
        entry["strategy"] = strategy
    if "health_check_interval" in entry and not _number(entry["health_check_interval"], 0):
        problems.append("health_check_interval: must be a number of seconds, 0 or more")
    for key in ("failure_threshold", "recovery_threshold"):
        if key in entry and not _whole(entry[key], 1):
            problems.append(f"{key}: must be a whole number, 1 or more")
    if "weights" in entry:
        weights = entry["weights"]
        names = _weighable(config)
        if not isinstance(weights, dict) or not all(_number(value, 0) for value in weights.values()):
            problems.append("weights: must map deployment or model names to numbers")
        else:
            problems += [f"weights: names no deployment or model {name!r}" for name in weights if name not in names]
    if problems:
        raise ConfigError(problems)
    return entry


def apply_overrides(config: Config, overrides: Overrides) -> tuple[Config, list[str]]:
    """The file's config with the overrides on top; a warning for each override naming something
    the file does not have (it applies again once the file has it)."""
    warnings = []
    models = []
    for model in config.models:
        patch = overrides.models.get(model.name)
        models.append(_model(model, patch, config) if patch else model)
    warnings += [f"override of model {name!r} ignored: no such model in the config"
                 for name in overrides.models if config.model(name) is None]
    config = replace(config, models=tuple(models))
    balancing = overrides.balancing
    if balancing:
        config, missing = _balancing(config, balancing)
        warnings += [f"load-balancing weight of {name!r} ignored: no such deployment or model" for name in missing]
    return config, warnings


def model_settings(model: ModelConfig) -> dict[str, Any]:
    """GET /config/models/{id}: the effective values."""
    parameters = {("default_temperature" if name == "temperature" else name): value for name, value in model.defaults}
    return {
        "enabled": model.enabled, "priority": model.priority,
        "rate_limit": {"requests_per_minute": model.rpm, "tokens_per_minute": model.tpm},
        "fallback_models": list(model.fallbacks), "parameters": parameters,
    }


def balancing_settings(config: Config) -> dict[str, Any]:
    """GET /config/load-balancing: the effective values, weights by deployment."""
    return {
        "strategy": config.routing.strategy, "health_check_interval": config.health.interval,
        "failure_threshold": config.health.failure_threshold, "recovery_threshold": config.health.recovery_threshold,
        "weights": {deployment.name: deployment.weight for deployment in config.deployments},
    }


def _model(model: ModelConfig, patch: Mapping[str, Any], config: Config) -> ModelConfig:
    changes: dict[str, Any] = {}
    if "enabled" in patch:
        changes["enabled"] = patch["enabled"]
    if "priority" in patch:
        changes["priority"] = patch["priority"]
    if "rate_limit" in patch:
        limits = patch["rate_limit"] or {}
        changes["rpm"], changes["tpm"] = limits.get("requests_per_minute"), limits.get("tokens_per_minute")
    if "fallback_models" in patch:  # names the file no longer has are left out
        changes["fallbacks"] = tuple(name for name in patch["fallback_models"] if config.model(name) is not None)
    if "parameters" in patch:
        changes["defaults"] = tuple(
            ("temperature" if name == "default_temperature" else name, value)
            for name, value in patch["parameters"].items()
        )
    return replace(model, **changes)


def _balancing(config: Config, patch: Mapping[str, Any]) -> tuple[Config, list[str]]:
    if "strategy" in patch:
        config = replace(config, routing=replace(config.routing, strategy=patch["strategy"]))
    health = {name: patch[key] for key, name in (("health_check_interval", "interval"),
                                                 ("failure_threshold", "failure_threshold"),
                                                 ("recovery_threshold", "recovery_threshold")) if key in patch}
    if health:
        config = replace(config, health=replace(config.health, **health))
    weights: Mapping[str, float] = patch.get("weights") or {}
    weighable = _weighable(config)
    missing = [name for name in weights if name not in weighable]
    if weights:
        models = []
        for model in config.models:
            deployments = tuple(
                replace(deployment, weight=float(weights.get(deployment.name, weights.get(model.name,
                                                                                          deployment.weight))))
                for deployment in model.deployments
            )
            models.append(replace(model, deployments=deployments))
        config = replace(config, models=tuple(models))
    return config, missing


def _weighable(config: Config) -> set[str]:
    """What a load-balancing weight may name: a deployment, or a model (all its deployments)."""
    return {model.name for model in config.models} | {deployment.name for deployment in config.deployments}


def _object(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConfigError(["body: must be a JSON object"])
    unknown = [f"{key}: unknown field (known: {', '.join(allowed)})" for key in body if key not in allowed]
    if unknown:
        raise ConfigError(unknown)
    return dict(body)


def _rate_limit_problems(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict) or set(value) - {"requests_per_minute", "tokens_per_minute"}:
        return ["rate_limit: must be {requests_per_minute, tokens_per_minute}"]
    return [f"rate_limit.{key}: must be a whole number, 1 or more" for key, limit in value.items()
            if limit is not None and not _whole(limit, 1)]


def _whole(value: Any, minimum: int | None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _number(value: Any, minimum: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum
