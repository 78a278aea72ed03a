"""proxykit: an ASGI reverse proxy for OpenAI-compatible LLM APIs."""

from proxykit.app import create_app
from proxykit.body import replay
from proxykit.config import Config, ConfigError
from proxykit.config.reader import config_from_dict, load_config
from proxykit.context import RequestContext, ensure_context, get_context
from proxykit.demo import DemoUpstream
from proxykit.errors import ProxyError
from proxykit.forward import Forwarder
from proxykit.keys.pool import KeyPool
from proxykit.limits.base import MemoryRateLimiter, RateLimiter
from proxykit.logs import RequestIdFilter
from proxykit.metrics import ProxyMetrics
from proxykit.middleware.auth import AuthMiddleware
from proxykit.middleware.metrics import MetricsMiddleware
from proxykit.middleware.ratelimit import ClientLimits, RateLimitMiddleware
from proxykit.middleware.request_id import RequestIdMiddleware
from proxykit.middleware.retry import RetryMiddleware, RetryPolicy
from proxykit.middleware.rotation import KeyRotationMiddleware
from proxykit.resources import Resources
from proxykit.respond import send_error
from proxykit.upstream.transport import AiohttpTransport, Http1Transport

__version__ = "0.1.0"

__all__ = [
    "AiohttpTransport",
    "AuthMiddleware",
    "ClientLimits",
    "Config",
    "ConfigError",
    "DemoUpstream",
    "Forwarder",
    "Http1Transport",
    "KeyPool",
    "KeyRotationMiddleware",
    "MemoryRateLimiter",
    "MetricsMiddleware",
    "ProxyError",
    "ProxyMetrics",
    "RateLimitMiddleware",
    "RateLimiter",
    "RequestContext",
    "RequestIdFilter",
    "RequestIdMiddleware",
    "Resources",
    "RetryMiddleware",
    "RetryPolicy",
    "config_from_dict",
    "create_app",
    "ensure_context",
    "get_context",
    "load_config",
    "replay",
    "send_error",
]
