"""Which model entry a request names, and whether its client may use it."""

from __future__ import annotations

from fnmatch import fnmatchcase

from proxykit.config import Config, ModelConfig
from proxykit.errors import ModelNotAllowed, ModelNotFound, ModelUnavailable

_HINTED = 5  # models named in a model_not_found message


def is_model_allowed(model: str, allowed: tuple[str, ...] | None) -> bool:
    """`allowed` holds globs (`deepseek-ai/*`); None allows every model."""
    return allowed is None or any(fnmatchcase(model, pattern) for pattern in allowed)


def resolve_model(config: Config, name: str, allowed: tuple[str, ...] | None) -> ModelConfig:
    # The allow-list is checked first, so a client cannot probe which models exist.
    if not is_model_allowed(name, allowed):
        raise ModelNotAllowed(f"this API key may not use the model {name!r}")
    model = config.model(name)
    if model is None:
        usable = [model.name for model in config.models if is_model_allowed(model.name, allowed)]
        hint = f"; models you may use: {', '.join(usable[:_HINTED])}" if usable else ""
        more = f" and {len(usable) - _HINTED} more (GET /v1/models)" if len(usable) > _HINTED else ""
        raise ModelNotFound(f"the model {name!r} does not exist{hint}{more}")
    if not model.enabled:
        raise ModelUnavailable(f"the model {name!r} is disabled for now")
    return model
