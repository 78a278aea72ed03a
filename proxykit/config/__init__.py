"""Configuration: the frozen dataclasses (`model`), reading and validating YAML or a dict with
every problem named by its field path (`reader`, over the typed field reads of `fields`).

    config = load_config("proxykit.yaml")

The names other subsystems use are here; the rest are in `proxykit.config.model`.
"""

from proxykit.config.model import (
    ROUTING_STRATEGIES,
    ClientKey,
    Config,
    ConfigError,
    CooldownConfig,
    Deployment,
    ModelConfig,
    Pricing,
    UpstreamKey,
)
from proxykit.config.reader import config_from_dict, load_config, read_key_file

__all__ = [
    "ROUTING_STRATEGIES",
    "ClientKey",
    "Config",
    "ConfigError",
    "CooldownConfig",
    "Deployment",
    "ModelConfig",
    "Pricing",
    "UpstreamKey",
    "config_from_dict",
    "load_config",
    "read_key_file",
]
