"""Key rotation: picks the deployment and upstream key for each attempt, and learns from the answer."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.body import add_defaults, ensure_payload, or_answer, requested_model, wait_unless_disconnected
from proxykit.config import ModelConfig
from proxykit.context import RequestContext, ensure_context
from proxykit.keys.choice import choose_key, learn, no_key_error, soonest_return
from proxykit.keys.pool import KeyPool
from proxykit.keys.state import KeyState
from proxykit.limits.base import RateLimiter
from proxykit.outcomes import CONNECTION_FAILURES, RestReason
from proxykit.respond import send_error
from proxykit.routing import resolve_model
from proxykit.sends import step_aside


class KeyRotationMiddleware:
    """Chooses a key of the requested model (then of its fallbacks) that this request has not
    tried yet, records it in the context for the forwarder, and applies the upstream's answer to
    the key: a 429 rests it, a 401/403 sets it aside, repeated failures rest it.

        Middleware(KeyRotationMiddleware, pool=KeyPool(config), max_body_bytes=20_000_000)
    """

    def __init__(
        self, app: ASGIApp, *, pool: KeyPool, max_body_bytes: int, queue_timeout: float = 0.0,
        shared_limiter: RateLimiter | None = None,
    ) -> None:
        self.app = app
        self.pool = pool
        self.max_body_bytes = max_body_bytes
        self.queue_timeout = queue_timeout
        # With several replicas, a key's rpm is one shared bucket: the local choice is confirmed there.
        self.shared_limiter = shared_limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = ensure_context(scope)
        model = await or_answer(self._model(scope, receive, ctx), scope, receive, send)
        if model is None:
            return
        if ctx.model != model.name:
            ctx.set_model(model.name)
        state = await self._choose_shared(model, ctx)
        if state is None and not ctx.tried and self.queue_timeout > 0:
            state = await self._wait_for_room(model, ctx, receive)
        if ctx.disconnected:
            return
        if state is None:
            ctx.no_upstream, ctx.next_key_in = True, soonest_return(self.pool, model)
            await send_error(no_key_error(self.pool.why_none(model.name)), scope, receive, send)
            return
        ctx.key, ctx.deployment, ctx.key_alias = state, state.deployment.name, state.alias
        ctx.tried.append(state)
        ctx.outcome = None

        async def send_and_learn(message: Message) -> None:
            if message["type"] == "http.response.start" and ctx.outcome is not None:
                self._learn(state, ctx, message)
            await send(message)

        step_aside(send_and_learn, send)  # the start is all it reads
        try:
            await self.app(scope, receive, send_and_learn)
        finally:
            self.pool.release(state)

    def _choose(self, model: ModelConfig, ctx: RequestContext) -> KeyState | None:
        chosen = choose_key(self.pool, model, tried=ctx.tried, skip_deployments=ctx.skip_deployments)
        if chosen is None:
            return None
        state, ctx.served_by = chosen
        return state

    async def _model(self, scope: Scope, receive: Receive, ctx: RequestContext) -> ModelConfig:
        await ensure_payload(scope, receive, self.max_body_bytes)
        model = resolve_model(self.pool.config, requested_model(ctx), ctx.allowed_models)
        add_defaults(ctx, model.defaults)
        return model

    async def _choose_shared(self, model: ModelConfig, ctx: RequestContext) -> KeyState | None:
        state = self._choose(model, ctx)
        for _ in range(3):  # a few keys at most: each costs a round trip
            if state is None or self.shared_limiter is None or not state.deployment.rpm:
                return state
            bucket = f"key:{state.deployment.name}:{state.alias}:rpm"
            [admission] = await self.shared_limiter.admit_all([(bucket, 1, state.deployment.rpm)])
            if admission.allowed:
                return state
            self.pool.release(state)  # other replicas filled it: full here too, for as long
            self.pool.mark_full(state, admission.retry_after)
            state = self._choose(model, ctx)
        if state is not None:
            self.pool.release(state)
        return None

    async def _wait_for_room(self, model: ModelConfig, ctx: RequestContext, receive: Receive) -> KeyState | None:
        """Every key is at its rpm/tpm: wait up to `queue_timeout` for one to make room. Resting
        keys are not waited for, and a client that leaves stops waiting."""
        deadline = time.monotonic() + self.queue_timeout
        while (why := self.pool.why_none(model.name)).reasons == (RestReason.FULL,):
            wait = min(why.retry_after, deadline - time.monotonic())
            if wait <= 0:
                return None
            if await wait_unless_disconnected(wait + 0.001, receive, ctx):
                return None
            if (state := await self._choose_shared(model, ctx)) is not None:
                return state
        return None

    def _learn(self, state: KeyState, ctx: RequestContext, message: Message) -> None:
        assert ctx.outcome is not None
        if ctx.outcome in CONNECTION_FAILURES:
            ctx.skip_deployments.add(state.deployment.name)  # its other keys would not connect either
        learn(self.pool, state, message["status"], ctx.outcome, message["headers"], ctx.attempt_ttfb)
