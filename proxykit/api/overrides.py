"""The management API's write routes (admin keys only): a model's settings, load balancing, an
upstream key in or out of rotation, and back to the file. Each change is checked like the file
(400 naming the field, nothing changed), applied at once, and kept in the store as an override
on top of the file.

    Mount("/api/llm", routes=[*OverrideRoutes(live, check).routes()])
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from proxykit.config import ConfigError, ModelConfig
from proxykit.config.overrides import (
    Overrides,
    balancing_settings,
    key_hash,
    model_settings,
    patch_of_balancing,
    patch_of_model,
)
from proxykit.context import RequestContext
from proxykit.errors import AdminOnly, InvalidRequest, ModelNotFound, RouteNotFound, StoreUnreachable
from proxykit.live import Live
from proxykit.store.sql import StoreUnavailable

MAX_BODY = 1_000_000  # a settings change is small; anything larger is not one


class OverrideRoutes:
    def __init__(self, live: Live, check: Callable[[Scope], RequestContext]) -> None:
        self.live = live
        self.check = check  # the management API's access rule

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/config/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/config/models/{model_id:path}", self.put_model, methods=["PUT"]),
            Route("/config/load-balancing", self.get_balancing, methods=["GET"]),
            Route("/config/load-balancing", self.put_balancing, methods=["PUT"]),
            Route("/config/keys/{alias:path}", self.put_key, methods=["PUT"]),
            Route("/config/overrides", self.delete_overrides, methods=["DELETE"]),
        ]

    async def get_model(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(model_settings(self._model(request)))

    async def put_model(self, request: Request) -> Response:
        self._admin(request)
        name = self._model(request).name
        patch = _checked(lambda body: patch_of_model(body, self.live.config, name), await _body(request))
        overrides = self.live.overrides
        merged = {**overrides.models.get(name, {}), **patch}  # a PUT changes only the fields it names
        persisted = await self._set(replace(overrides, models={**overrides.models, name: merged}))
        return JSONResponse({**model_settings(self._model(request)), "persisted": persisted})

    async def get_balancing(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(balancing_settings(self.live.config))

    async def put_balancing(self, request: Request) -> Response:
        self._admin(request)
        patch = _checked(lambda body: patch_of_balancing(body, self.live.config), await _body(request))
        overrides = self.live.overrides
        persisted = await self._set(replace(overrides, balancing={**overrides.balancing, **patch}))
        return JSONResponse({**balancing_settings(self.live.config), "persisted": persisted})

    async def put_key(self, request: Request) -> Response:
        self._admin(request)
        alias = request.path_params["alias"]
        state = next((state for state in self.live.resources.keys.all_keys() if state.alias == alias), None)
        if state is None:
            raise RouteNotFound(f"no upstream key has the alias {alias[:128]!r}")
        body = await _body(request)
        if not isinstance(body, dict) or set(body) != {"enabled"} or not isinstance(body["enabled"], bool):
            raise InvalidRequest("enabled: the body must be {\"enabled\": true or false}")
        overrides = self.live.overrides
        keys = {**overrides.keys, key_hash(state.deployment.name, state.secret): body["enabled"]}
        persisted = await self._set(replace(overrides, keys=keys))
        return JSONResponse({"alias": alias, "enabled": body["enabled"], "persisted": persisted})

    async def delete_overrides(self, request: Request) -> Response:
        self._admin(request)
        persisted = await self._set(Overrides())
        return JSONResponse({"overrides": "cleared", "persisted": persisted})

    def _admin(self, request: Request) -> None:
        if not self.check(request.scope).admin:
            raise AdminOnly("only an admin key may change the configuration")

    def _model(self, request: Request) -> ModelConfig:
        name = request.path_params["model_id"]
        model = self.live.config.model(name)
        if model is None:
            raise ModelNotFound(f"the model {name[:128]!r} does not exist")
        return model

    async def _set(self, overrides: Overrides) -> bool:
        try:
            return await self.live.set_overrides(overrides)
        except StoreUnavailable:
            raise StoreUnreachable("the store cannot be reached: nothing was changed") from None


async def _body(request: Request) -> Any:
    body = b""
    async for chunk in request.stream():  # counted as it arrives: a large upload stops early
        body += chunk
        if len(body) > MAX_BODY:
            raise InvalidRequest("the body is too large for a settings change")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the body is not valid JSON") from None


def _checked(check: Callable[[Any], dict[str, Any]], body: Any) -> dict[str, Any]:
    try:
        return check(body)
    except ConfigError as exc:
        raise InvalidRequest("; ".join(exc.problems)) from None
