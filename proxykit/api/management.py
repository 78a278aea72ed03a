"""The management API under `management.path` (CONTRACT section 9): the multi-model service
surface of seed 002, so its Python `LLMClient` works with `base_url` pointed here.

    Mount("/api/llm", routes=ManagementApi(resources, forwarding).routes())

Access: with auth on, `admin: true` keys see everything and the others only their own usage,
requests and budget; with auth off, only loopback clients are answered (and see everything).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from proxykit.api import stats
from proxykit.api.generate import GenerateEndpoint
from proxykit.api.overrides import OverrideRoutes
from proxykit.config import ModelConfig
from proxykit.context import RequestContext, ensure_context
from proxykit.errors import AdminOnly, InvalidRequest, RouteNotFound, StoreUnreachable
from proxykit.keys.state import KeyStatus
from proxykit.live import Live
from proxykit.resources import Resources
from proxykit.routing import is_model_allowed
from proxykit.store.base import iso_time
from proxykit.store.sql import SqlStore, StoreUnavailable

T = TypeVar("T")

MAX_ROWS: Final = 1000
STATUS_WINDOW: Final = 300.0  # seconds of requests a model's status is worked out from


class ManagementApi:
    def __init__(self, resources: Resources, live: Live) -> None:
        self.resources = resources
        self.live = live

    def routes(self) -> list[BaseRoute]:
        def generate(stream: bool) -> GenerateEndpoint:
            return GenerateEndpoint(self.live, stream=stream, check=self.check)

        return [
            Route("/generate", generate(stream=False), methods=["POST"]),
            Route("/generate/stream", generate(stream=True), methods=["POST"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/models/{model_id:path}/status", self.model_status, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/stats/usage", self.usage, methods=["GET"]),
            Route("/stats/performance", self.performance, methods=["GET"]),
            Route("/stats/budgets", self.budgets, methods=["GET"]),
            Route("/requests", self.requests, methods=["GET"]),
            Route("/requests/{request_id:path}", self.request, methods=["GET"]),
            *OverrideRoutes(self.live, self.check).routes(),
        ]

    def check(self, scope: Scope) -> RequestContext:
        """The caller's context, or AdminOnly for a caller this API does not answer."""
        ctx = ensure_context(scope)
        if not self.resources.config.auth.enabled:
            if not _loopback(scope):
                raise AdminOnly("with auth off, the management API answers loopback clients only")
            ctx.admin = True
        return ctx

    # Models and health

    async def models(self, request: Request) -> Response:
        ctx = self.check(request.scope)
        listed = sorted((model for model in self.resources.config.models
                         if is_model_allowed(model.name, ctx.allowed_models)), key=lambda model: model.priority)
        return JSONResponse({"models": [self._model_entry(model) for model in listed]})

    async def model_status(self, request: Request) -> Response:
        ctx = self.check(request.scope)
        model = self.resources.config.model(request.path_params["model_id"])
        if model is None or not is_model_allowed(model.name, ctx.allowed_models):
            raise RouteNotFound(f"the model {request.path_params['model_id']!r} does not exist")
        keys = self._key_counts(model)
        health = self._health(model, keys)
        checks = self.resources.health
        checked = [found for d in model.deployments
                   if checks is not None and (found := checks.of(d.name).last_check) is not None]
        answer: dict[str, Any] = {
            "model_id": model.name, "status": _STATUS[health], "health": health,
            "response_time_ms": None, "last_check": iso_time(max(checked)) if checked else None,
            "error_rate": None, "keys": keys,
            "deployments": {d.name: "unhealthy" if d.name in self.resources.keys.unhealthy else "healthy"
                            for d in model.deployments},
        }
        ledger = self.resources.ledger
        if ledger is not None:
            since = time.time() - STATUS_WINDOW
            try:
                window = await ledger.read(lambda store: store.model_window(model.name, since))
            except StoreUnavailable:  # the keys and health above still answer
                window = (0, 0.0, 0, 0.0)
            count, average, errors, last = window
            if count:
                answer["response_time_ms"] = round(average, 1)
                answer["error_rate"] = round(errors / count, 4)
                answer["last_check"] = answer["last_check"] or iso_time(last)  # no active check yet
        return JSONResponse(answer)

    async def health(self, request: Request) -> Response:
        self.check(request.scope)
        healths = [self._health(model) for model in self.resources.config.models]
        counts = {state: healths.count(state) for state in ("healthy", "degraded", "unhealthy")}
        upstreams = "unhealthy" if not counts["healthy"] and not counts["degraded"] else \
            "degraded" if counts["degraded"] or counts["unhealthy"] else "healthy"
        ledger = self.resources.ledger
        store = "disabled" if ledger is None else "healthy" if await ledger.probe() else "unhealthy"
        status = upstreams if upstreams != "healthy" or store != "unhealthy" else "degraded"
        return JSONResponse({
            "status": status,
            "timestamp": iso_time(time.time()),
            "services": {"upstreams": upstreams, "store": store, "limits": self._limits_health()},
            "models": {"available": counts["healthy"] + counts["degraded"], "healthy": counts["healthy"],
                       "degraded": counts["degraded"], "unavailable": counts["unhealthy"]},
        })

    # The store

    async def usage(self, request: Request) -> Response:
        ctx = self.check(request.scope)
        query = request.query_params
        client = self._own_client(ctx, query.get("client"))
        first, last = stats.date_range(query.get("start_date"), query.get("end_date"), dt.datetime.now(dt.UTC).date())
        start, end = stats.epoch(first), stats.epoch(last) + 86400
        model = query.get("model") or None
        totals = await self._read(lambda store: store.usage_totals(start, end, model=model, client=client))
        return JSONResponse(stats.usage_answer(first, last, totals))

    async def performance(self, request: Request) -> Response:
        ctx = self.check(request.scope)
        minutes = _int_param(request, "minutes", 60, 1, 7 * 24 * 60)
        model = request.query_params.get("model") or None
        client = None if ctx.admin else ctx.client
        since = time.time() - minutes * 60
        sample = await self._read(lambda store: store.performance_sample(
            since, model=model, client=client, limit=stats.PERFORMANCE_SAMPLE))
        return JSONResponse(stats.performance_answer(minutes, sample))

    async def budgets(self, request: Request) -> Response:
        ctx = self.check(request.scope)
        book = self.resources.spend
        if book is None:
            return JSONResponse({"budgets": {}})
        clients = list(book.budgets) if ctx.admin else [ctx.client]
        return JSONResponse(stats.budgets_answer(book, clients, time.time()))

    async def requests(self, request: Request) -> Response:
        ctx = self.check(request.scope)
        query = request.query_params
        client = self._own_client(ctx, query.get("client"))
        limit = _int_param(request, "limit", 50, 1, MAX_ROWS)
        status = _int_param(request, "status", None, 100, 599)
        since = stats.since_time(query.get("since"))
        model = query.get("model") or None
        rows = await self._read(lambda store: store.rows(limit=limit, client=client, model=model, status=status,
                                                         since=since))
        return JSONResponse({"requests": [row.as_json() for row in rows]})

    async def request(self, request: Request) -> Response:
        ctx = self.check(request.scope)
        request_id = request.path_params["request_id"]
        client = None if ctx.admin else ctx.client
        rows = await self._read(lambda store: store.rows(limit=1, request_id=request_id, client=client))
        if not rows:
            raise RouteNotFound(f"no request {request_id[:128]!r} in the store")
        return JSONResponse(rows[0].as_json())

    # Helpers

    async def _read(self, query: Callable[[SqlStore], T]) -> T:
        ledger = self.resources.ledger
        if ledger is None:
            raise StoreUnreachable("the usage store is off (store.url: none)")
        try:
            return await ledger.read(query)
        except StoreUnavailable:
            raise StoreUnreachable("the usage store cannot be reached now") from None

    @staticmethod
    def _own_client(ctx: RequestContext, asked: str | None) -> str | None:
        """The client whose data a caller may read: any (or the one asked) for an admin, else its own."""
        if ctx.admin:
            return asked or None
        if asked and asked != ctx.client:
            raise AdminOnly("only an admin key may read another client's data")
        return ctx.client

    def _key_counts(self, model: ModelConfig) -> dict[str, int]:
        pool = self.resources.keys
        now = pool.clock()
        counts = {status.value: 0 for status in KeyStatus}
        for state in pool.models[model.name].keys:
            counts[state.status(now).value] += 1
        return counts

    def _model_entry(self, model: ModelConfig) -> dict[str, Any]:
        largest = max((deployment.max_tokens or 0 for deployment in model.deployments), default=0) or None
        pricing = model.pricing
        return {
            "id": model.name, "name": model.name, "provider": _provider(model), "type": "text",
            "status": _STATUS[self._health(model)], "priority": model.priority,
            "capabilities": ["text-generation", "conversation"],
            "limits": {"max_tokens": largest, "context_window": largest},
            "pricing": None if pricing is None else
            {"input_per_1m": pricing.input_per_1m, "output_per_1m": pricing.output_per_1m},
        }

    def _health(self, model: ModelConfig, keys: dict[str, int] | None = None) -> str:
        """`unhealthy`: it cannot serve (no usable key, or every deployment failed its checks);
        `degraded`: it serves, not at full strength; `healthy`: every key and deployment is."""
        keys = keys or self._key_counts(model)
        sick = sum(1 for d in model.deployments if d.name in self.resources.keys.unhealthy)
        if not model.enabled or not keys["available"] or sick == len(model.deployments):
            return "unhealthy"
        return "healthy" if keys["available"] == sum(keys.values()) and not sick else "degraded"

    def _limits_health(self) -> str:
        redis = self.resources.redis
        if redis is None:
            return "healthy"
        return "healthy" if redis.usable else "degraded"


_STATUS = {"healthy": "available", "degraded": "degraded", "unhealthy": "unavailable"}


def _provider(model: ModelConfig) -> str:
    """The host of the first deployment's base_url: where the model is served from."""
    host = model.deployments[0].base_url.split("://", 1)[-1].split("/", 1)[0]
    return host.rsplit("@", 1)[-1]  # never the user and password of a URL


def _loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False  # no peer address: not provably local
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def _int_param(request: Request, name: str, default: T, low: int, high: int) -> int | T:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be from {low} to {high}")
    return value

