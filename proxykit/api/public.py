"""proxykit's own routes: liveness, readiness and the model list."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxykit.config import ModelConfig
from proxykit.context import ensure_context
from proxykit.errors import ModelNotFound, RouteNotFound
from proxykit.keys.state import KeyStatus
from proxykit.resources import Resources, ResourceState
from proxykit.routing import is_model_allowed


class Endpoints:
    """Starlette endpoints bound to one app's resources.

        Route("/health", Endpoints(resources).health)
    """

    def __init__(self, resources: Resources) -> None:
        self.resources = resources

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """503 only for this process's own state: not open, or draining after SIGTERM. One dead
        upstream never makes it 503, which would take every replica out at once. The body shows,
        per model and deployment, how many keys are available, resting and set aside, and when
        the next one returns. Aliases only, never a key."""
        resources = self.resources
        if not resources.draining and resources.state is not ResourceState.CLOSED:
            await resources.ensure_open()  # a host that does not run the lifespan opens here
        pool = resources.keys
        now = pool.clock()
        models: dict[str, Any] = {}
        for name, model_keys in pool.models.items():
            deployments: dict[str, Any] = {}
            for state in model_keys.keys:
                entry = deployments.setdefault(state.deployment.name, {
                    "available": 0, "resting": 0, "set_aside": 0, "reasons": {}, "next_return_s": None,
                    "healthy": state.deployment.name not in pool.unhealthy,
                })
                status = state.status(now)
                entry[status.value] += 1
                if status is not KeyStatus.AVAILABLE:
                    entry["reasons"][state.reason or "resting"] = entry["reasons"].get(state.reason or "resting", 0) + 1
                    wait = round(max(0.0, state.until - now), 1)
                    if entry["next_return_s"] is None or wait < entry["next_return_s"]:
                        entry["next_return_s"] = wait
            usable = any(entry["available"] for entry in deployments.values())
            models[name] = {"ready": usable, "deployments": deployments}
        if resources.draining:
            readiness = "draining"
        elif resources.state is not ResourceState.OPENED:
            readiness = "not_open"
        else:
            readiness = "ok"
        return JSONResponse({"status": readiness, "models": models}, status_code=200 if readiness == "ok" else 503)

    async def metrics(self, request: Request) -> Response:
        if not self.resources.config.metrics.enabled:
            raise RouteNotFound(f"no route for {request.url.path}: metrics are off")
        return Response(await self.resources.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        allowed = ensure_context(request.scope).allowed_models
        data = [
            _model_object(model) for model in self.resources.config.models
            if model.enabled and is_model_allowed(model.name, allowed)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        model = self.resources.config.model(name)
        allowed = ensure_context(request.scope).allowed_models
        if model is None or not model.enabled or not is_model_allowed(name, allowed):
            raise ModelNotFound(f"the model {name!r} does not exist")
        return JSONResponse(_model_object(model))


def _model_object(model: ModelConfig) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": model.name, "object": "model", "created": 0, "owned_by": "proxykit"}
    limits = [deployment.max_tokens for deployment in model.deployments if deployment.max_tokens]
    if limits:
        entry["max_tokens"] = min(limits)  # what every deployment can honour
    return entry
