"""Configuration: the frozen dataclasses (`model`), reading and validating YAML or a dict with
every problem named by its field path (`reader`, over the typed field reads of `fields`).

    config = load_config("proxykit.yaml")
"""

from proxykit.config.model import (
    LIMIT_BACKENDS,
    RETRY_REASONS,
    ROUTING_STRATEGIES,
    AuthConfig,
    BackoffConfig,
    ClientKey,
    Config,
    ConfigError,
    CooldownConfig,
    Deployment,
    LimitsConfig,
    MetricsConfig,
    ModelConfig,
    Pricing,
    RetryConfig,
    RoutingConfig,
    TimeoutConfig,
    UpstreamKey,
)
from proxykit.config.reader import config_from_dict, load_config, read_key_file

__all__ = [
    "LIMIT_BACKENDS",
    "RETRY_REASONS",
    "ROUTING_STRATEGIES",
    "AuthConfig",
    "BackoffConfig",
    "ClientKey",
    "Config",
    "ConfigError",
    "CooldownConfig",
    "Deployment",
    "LimitsConfig",
    "MetricsConfig",
    "ModelConfig",
    "Pricing",
    "RetryConfig",
    "RoutingConfig",
    "TimeoutConfig",
    "UpstreamKey",
    "config_from_dict",
    "load_config",
    "read_key_file",
]
