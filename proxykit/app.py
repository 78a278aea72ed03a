"""create_app(): the map of a request through proxykit, and the one place that knows both layer
lists, the routes and the lifespan.

Every request passes the outer layers, outermost first; then `/v1/...` (the model list aside)
goes to the forwarding layers, anything else to proxykit's own routes:

    outer:       RequestId -> Metrics -> Ledger (with a store) -> Auth -> ForwardingDispatch
    forwarding:  Budget (when any) -> RateLimit -> Cache (when on) -> Retry -> KeyRotation -> Forwarder
    routes:      /health, /health/ready, /metrics, /v1/models, /v1/models/{id} (and without /v1),
                 the management API under `management.path` (its /generate enters the forwarding
                 layers as a chat completion)

OpenAI's routes are served without `/v1` too (`/chat/completions`, `/models`, ...), for clients
whose base URL has none.

Three fast paths keep proxykit's own cost per request small, each in one place:

* step-aside (`proxykit/sends.py`): a layer that has seen what it needs of a response (its
  start, or its first chunk) says so, and the forwarder sends the rest of a stream past it;
* the relay task (`Forwarder` in `proxykit/forward.py`): an event stream is relayed by a task of
  its own, so each event resumes two frames instead of every layer's coroutine;
* the watch timer (`proxykit/watch.py`): one timer for all attempts in flight notices clients
  that leave and first-byte deadlines that pass, instead of a task and a timer per request.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Final

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxykit.api.management import ManagementApi
from proxykit.api.public import Endpoints
from proxykit.config import Config
from proxykit.config.live import ConfigFile
from proxykit.config.reader import config_from_dict, load_config
from proxykit.context import ensure_context
from proxykit.errors import InternalError, MethodNotAllowed, ProxyError, RouteNotFound
from proxykit.forward import Forwarder
from proxykit.live import Live, LiveLayers
from proxykit.middleware.auth import AuthMiddleware
from proxykit.middleware.budget import BudgetMiddleware
from proxykit.middleware.cache import CacheMiddleware
from proxykit.middleware.ledger import LedgerMiddleware
from proxykit.middleware.metrics import MetricsMiddleware
from proxykit.middleware.ratelimit import ClientLimits, RateLimitMiddleware
from proxykit.middleware.request_id import RequestIdMiddleware
from proxykit.middleware.retry import RetryMiddleware, RetryPolicy
from proxykit.middleware.rotation import KeyRotationMiddleware
from proxykit.paths import route_path
from proxykit.resources import Resources
from proxykit.routing import resolve_model

logger = logging.getLogger(__name__)

_OPEN_PATHS = ("/health", "/health/ready")  # probes carry no key
# The first path segments of OpenAI's API (and Anthropic's `messages`): forwarded without `/v1`
# too, as LiteLLM's proxy does, for clients whose base URL has none.
OPENAI_ROOTS: Final = frozenset({
    "chat", "completions", "embeddings", "responses", "audio", "images", "moderations", "messages", "rerank",
    "files", "batches", "uploads", "fine_tuning", "vector_stores", "assistants", "threads",
})


def create_app(
    config: Config | dict[str, Any] | str | os.PathLike[str],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """The whole gateway as one ASGI app, with its own lifespan.

        app = create_app("proxykit.yaml")
        host = Starlette(routes=[Mount("/llm", app=app)], lifespan=app.router.lifespan_context)

    `transport` replaces the upstream transport (tests plug respx in here).
    """
    source = None if isinstance(config, (Config, dict)) else ConfigFile(config)
    config = _as_config(config)
    resources = Resources(config, transport=transport)
    live = Live(resources, _layers, source=source)
    endpoints = Endpoints(resources)
    routes = [
        Route(config.metrics.path, endpoints.metrics, methods=["GET"]),
        Route("/health", endpoints.health, methods=["GET"]),
        Route("/health/ready", endpoints.ready, methods=["GET"]),
        Route("/v1/models", endpoints.models, methods=["GET"]),
        Route("/v1/models/{name:path}", endpoints.model, methods=["GET"]),
        Route("/models", endpoints.models, methods=["GET"]),  # for clients whose base URL has no /v1
        Route("/models/{name:path}", endpoints.model, methods=["GET"]),
        Mount(config.management.path, routes=ManagementApi(resources, live).routes()),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(LiveLayers, live=live)],
        lifespan=live.lifespan,
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.resources = resources
    app.state.proxykit = live
    return app


def _layers(resources: Resources, routes: ASGIApp) -> tuple[ASGIApp, ASGIApp]:
    """The layers of the running config: the outer ones around the routes, and the forwarding
    ones they send `/v1/...` to. Built again on every reload."""
    forwarding = _forwarding_layers(resources)
    outer: ASGIApp = ForwardingDispatch(routes, forwarding=forwarding)
    for layer in reversed(_outer_layers(resources)):
        outer = layer.cls(outer, *layer.args, **layer.kwargs)
    return outer, forwarding


def _outer_layers(resources: Resources) -> list[Middleware]:
    """RequestId -> Metrics -> Ledger -> Auth -> ForwardingDispatch: every response, 401s and 429s
    included, gets an id and is counted, and every LLM request is recorded."""
    config = resources.config
    layers = [Middleware(RequestIdMiddleware)]
    pricing = {model.name: model.pricing for model in config.models if model.pricing}
    if config.metrics.enabled:
        layers.append(Middleware(MetricsMiddleware, metrics=resources.metrics, pricing=pricing))
    if resources.ledger is not None:
        generate = (config.management.path + "/generate", config.management.path + "/generate/stream")

        def recorded(scope: Scope) -> bool:  # the LLM requests: forwarded ones and /generate
            path = route_path(scope)
            return forwarded(scope["method"], path) or path in generate

        layers.append(Middleware(LedgerMiddleware, ledger=resources.ledger, pricing=pricing, recorded=recorded))
    if config.auth.enabled:
        open_paths = _OPEN_PATHS if config.metrics.require_key else (*_OPEN_PATHS, config.metrics.path)
        layers.append(Middleware(AuthMiddleware, keys=config.auth.keys, open_paths=open_paths))
    return layers


def _forwarding_layers(resources: Resources) -> ASGIApp:
    """RateLimit -> Cache -> Retry -> KeyRotation -> Forwarder: limits apply before any upstream
    attempt is spent (or a cached answer given), and rotation sits inside retry so each attempt
    gets a fresh key whose outcome is recorded first."""
    config = resources.config
    body_limit = config.limits.max_body_bytes
    app: ASGIApp = Forwarder(resources)
    app = KeyRotationMiddleware(
        app, pool=resources.keys, max_body_bytes=body_limit, queue_timeout=config.limits.queue_timeout,
        shared_limiter=resources.limiter if resources.redis is not None else None,
    )
    if config.retry.attempts:  # none configured: no layer to pass through
        app = RetryMiddleware(app, policy=RetryPolicy.from_config(config), max_body_bytes=body_limit)
    if resources.cache is not None:  # inside the limits (a hit counts against rpm), outside retry
        cache = config.cache
        app = CacheMiddleware(
            app, backend=resources.cache, ttl=cache.ttl, shared_between_clients=cache.shared_between_clients,
            max_body_bytes=body_limit, max_entry_bytes=cache.max_bytes // 10,
            resolve=functools.partial(resolve_model, config),
        )
    if limits := ClientLimits.by_model(config.models):  # inside the client's: a refused client spends none
        app = RateLimitMiddleware(app, limits=limits, limiter=resources.limiter, max_body_bytes=body_limit,
                                  per="model")
    if limits := ClientLimits.by_client(config.auth.keys):
        app = RateLimitMiddleware(app, limits=limits, limiter=resources.limiter, max_body_bytes=body_limit)
    if resources.spend is not None and resources.spend.budgets:  # outermost: a client out of budget spends no rpm
        app = BudgetMiddleware(app, spend=resources.spend)
    return app


class ForwardingDispatch:
    """Sends `/v1/...` requests (the model list aside) to the forwarding layers, with `root_path`
    extended as `Mount("/v1")` would; everything else goes on to proxykit's own routes. A
    middleware rather than a mount: Starlette's router, mount and exception middleware would sit
    in every forwarded request's path, and the forwarding layers answer their own errors."""

    def __init__(self, app: ASGIApp, *, forwarding: ASGIApp) -> None:
        self.app = app
        self.forwarding = forwarding

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan has no path
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if not forwarded(scope["method"], path):
            await self.app(scope, receive, send)
        elif path.startswith("/v1/"):
            await self.forwarding({**scope, "root_path": scope.get("root_path", "") + "/v1"}, receive, send)
        else:
            await self.forwarding(scope, receive, send)  # a client whose base URL has no /v1


def forwarded(method: str, path: str) -> bool:
    """Whether a request goes to the forwarding layers: `/v1/...` and OpenAI's routes without
    `/v1`, the model list aside."""
    if path.startswith("/v1/"):
        return not _is_model_list(method, path[3:])
    return path.split("/", 2)[1] in OPENAI_ROOTS and not _is_model_list(method, path)


def _is_model_list(method: str, path: str) -> bool:
    """`path` below /v1, if it had one."""
    return method in ("GET", "HEAD") and (path == "/models" or path.startswith("/models/"))


def _as_config(config: Config | dict[str, Any] | str | os.PathLike[str]) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(Path(config))


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    body = exc.body(ensure_context(request.scope).request_id)
    return Response(body, exc.status, headers=exc.headers, media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return await _proxy_error(request, MethodNotAllowed(f"{request.method} is not allowed here"))
    return await _proxy_error(request, RouteNotFound(f"no route for {request.url.path}"))


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error", exc_info=exc)  # a bug: the traceback is for us, not the client
    return await _proxy_error(request, InternalError("proxykit failed on this request"))
