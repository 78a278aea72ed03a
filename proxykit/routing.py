"""Which model entry a request names, and whether its client may use it."""

from __future__ import annotations

from fnmatch import fnmatchcase

from proxykit.config import Config, ModelConfig
from proxykit.errors import ModelNotAllowed, ModelNotFound


def is_model_allowed(model: str, allowed: tuple[str, ...] | None) -> bool:
    """`allowed` holds globs (`deepseek-ai/*`); None allows every model."""
    return allowed is None or any(fnmatchcase(model, pattern) for pattern in allowed)


def resolve_model(config: Config, name: str, allowed: tuple[str, ...] | None) -> ModelConfig:
    # The allow-list is checked first, so a client cannot probe which models exist.
    if not is_model_allowed(name, allowed):
        raise ModelNotAllowed(f"this API key may not use the model {name!r}")
    model = config.model(name)
    if model is None:
        raise ModelNotFound(f"the model {name!r} does not exist")
    return model
