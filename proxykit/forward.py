"""The streaming forwarding endpoint: one upstream call per attempt, its answer relayed as it arrives."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import httpx
from starlette.types import Receive, Scope, Send

from proxykit.body import add_defaults, ensure_payload, or_answer, requested_model, with_members
from proxykit.config import Config, ModelConfig
from proxykit.context import RequestContext, ensure_context
from proxykit.errors import InvalidRequest, ProxyError, UpstreamError
from proxykit.headers import downstream_headers, upstream_headers
from proxykit.keys.choice import choose_key, learn, no_key_error
from proxykit.keys.state import KeyState
from proxykit.outcomes import Outcome, outcome_of
from proxykit.paths import leaves_its_base, route_path
from proxykit.redact import Redactor
from proxykit.resources import Resources
from proxykit.respond import send_error, send_error_to
from proxykit.routing import resolve_model
from proxykit.sends import beyond_stepped_aside
from proxykit.upstream.base import UpstreamResponse
from proxykit.upstream.failures import map_httpx_error
from proxykit.upstream.target import deployment_headers, join_url
from proxykit.usage.reader import UsageReader, carries_usage, without_usage_events
from proxykit.watch import AttemptWatch, AttemptWatches

logger = logging.getLogger(__name__)

_WHOLE_ERROR_BODY = 64 * 1024  # an upstream error body up to this size is redacted in one piece

# The APIs whose streams carry usage only on request (`stream_options.include_usage`). Others
# reject the option (the Responses API answers 400), and the Responses API sends usage anyway.
_STREAM_USAGE_ON_REQUEST = frozenset({"/chat/completions", "/completions"})


class Forwarder:
    """Sends each `/v1/...` request to the upstream picked for it and streams the answer back.

        Mount("/v1", app=Forwarder(resources))

    Without a key-rotation layer in front, it chooses the key itself by the same rule
    (`proxykit.keys.choice`) and records what the answer does to it, without retrying.
    """

    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: AttemptWatches  # of that loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await self.resources.ensure_open()
        ctx = ensure_context(scope)
        chosen_here = ctx.key is None  # no key-rotation layer in front: take the next key ourselves
        try:
            request = await or_answer(self._prepare(scope, receive, ctx, chosen_here), scope, receive, send)
            if request is not None:
                await self._forward(request, ctx, scope, receive, send, learns=chosen_here)
        finally:
            if chosen_here and ctx.key is not None:  # chosen here: given back here, whatever happened
                self.resources.keys.release(ctx.key)
                ctx.key = None

    async def _prepare(self, scope: Scope, receive: Receive, ctx: RequestContext, choose: bool) -> _UpstreamRequest:
        if leaves_its_base(route_path(scope)):  # the upstream key must never reach a path outside base_url
            raise InvalidRequest("the request path may not contain dot segments (. or ..)")
        if choose:
            self._choose(await self._model(scope, receive, ctx), ctx)
        return self._upstream_request(scope, ctx)

    async def _model(self, scope: Scope, receive: Receive, ctx: RequestContext) -> ModelConfig:
        config = self.resources.config
        await ensure_payload(scope, receive, config.limits.max_body_bytes)
        model = resolve_model(config, requested_model(ctx), ctx.allowed_models)
        ctx.set_model(model.name)
        add_defaults(ctx, model.defaults)
        return model

    def _choose(self, model: ModelConfig, ctx: RequestContext) -> None:
        pool = self.resources.keys
        chosen = choose_key(pool, model, tried=ctx.tried, skip_deployments=ctx.skip_deployments)
        if chosen is None:
            raise no_key_error(pool.why_none(model.name))
        state, ctx.served_by = chosen
        ctx.key, ctx.deployment, ctx.key_alias = state, state.deployment.name, state.alias
        ctx.tried.append(state)

    def _upstream_request(self, scope: Scope, ctx: RequestContext) -> _UpstreamRequest:
        assert ctx.key is not None and ctx.payload is not None and ctx.body is not None
        deployment, secret = ctx.key.deployment, ctx.key.secret
        payload, body = ctx.payload, ctx.body
        changes: dict[str, Any] = {}
        if deployment.model != payload["model"]:  # the upstream's id, or a fallback model's
            changes["model"] = deployment.model
        path = route_path(scope)
        if (
            _counts_usage(self.resources.config) and payload.get("stream") is True and path in _STREAM_USAGE_ON_REQUEST
            and _may_ask_for_usage(payload)
        ):
            # Streams carry usage only when asked; proxykit asks, and removes the extra event again.
            changes["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
            ctx.injected_usage = True
        if changes:
            try:
                body = with_members(body, payload, changes)
            except RecursionError:  # parsed just under the interpreter's limit, too deep to write again
                raise InvalidRequest("the request body is nested too deeply") from None
        headers = upstream_headers(scope["headers"])
        if ctx.injected_usage:
            # The extra usage event can be taken out of a stream proxykit can read: not compressed.
            headers = [(name, value) for name, value in headers if name != b"accept-encoding"]
            headers.append((b"accept-encoding", b"identity"))
        headers.append((b"x-request-id", ctx.request_id.encode("latin-1")))
        if deployment.headers:  # its static headers replace the client's of the same names
            own = {name.encode("latin-1") for name, _ in deployment.headers}
            headers = [(name, value) for name, value in headers if name not in own]
        headers += deployment_headers(deployment, secret)
        # The deployment's base_url ends in the API version (…/v1), as OpenAI SDK base URLs do.
        url = join_url(deployment.base_url, path, scope.get("query_string", b"").decode("latin-1"))
        return _UpstreamRequest(scope["method"], url, headers, body)

    async def _forward(
        self, request: _UpstreamRequest, ctx: RequestContext, scope: Scope, receive: Receive, send: Send, *,
        learns: bool,
    ) -> None:
        """One attempt. `learns`: no rotation layer in front, so the answer's effect on the key
        (a 429 rests it, ...) is recorded here."""
        ctx.finished = False
        ctx.attempt_started = time.perf_counter()
        task = self._current_task()
        watch = self._watches.watch(receive, ctx, task, self.resources.config.timeouts.first_byte)
        try:
            try:
                response = await self._open(request, ctx, watch, task)
            except ProxyError as error:
                watch.stop()
                ctx.record_attempt(error.outcome or Outcome.CONNECT_ERROR)
                if learns:
                    self._learn(ctx, error.status, ())
                await send_error(error, scope, receive, send)
                return
            if learns:
                self._learn(ctx, response.status, response.raw_headers)
            try:
                if is_event_stream := _is_event_stream(response):
                    # Every event would resume each coroutine this request runs in, a frame or two
                    # per layer; a task of its own resumes two. A cancel of this task (the client
                    # left) reaches the one it awaits.
                    await task.get_loop().create_task(self._relay(response, is_event_stream, ctx, send))
                else:
                    await self._relay(response, is_event_stream, ctx, send)
            finally:
                await response.aclose()  # synchronous underneath: a cancel cannot skip it
        except asyncio.CancelledError:
            if ctx.disconnected and task.uncancel() == 0:
                return  # our own cancel: the client left, and there is no one to answer
            raise
        finally:
            watch.stop()

    def _learn(self, ctx: RequestContext, status: int, raw_headers: Iterable[tuple[bytes, bytes]]) -> None:
        assert ctx.key is not None and ctx.outcome is not None
        learn(self.resources.keys, ctx.key, status, ctx.outcome, raw_headers, ctx.attempt_ttfb)

    def _current_task(self) -> asyncio.Task[Any]:
        # asyncio.current_task() asks for the running loop, and on Python 3.11 that costs a
        # getpid() system call. The loop of the last request is asked first; a task of another
        # loop (tests run one per test) is not found there, and the running loop is looked up.
        task = asyncio.current_task(self._loop) if self._loop is not None else None
        if task is None:
            self._loop = asyncio.get_running_loop()
            self._watches = AttemptWatches(self._loop)
            task = asyncio.current_task(self._loop)
        assert task is not None
        return task

    async def _open(
        self, request: _UpstreamRequest, ctx: RequestContext, watch: AttemptWatch, task: asyncio.Task[Any]
    ) -> UpstreamResponse:
        resources = self.resources
        try:
            response = await resources.upstream.open(*request, resources.timeouts)
        except asyncio.CancelledError:
            if watch.first_byte_late and task.uncancel() == 0:  # our own cancel: the deadline passed
                raise map_httpx_error(httpx.ReadTimeout("no first byte in time")) from None
            raise
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc) from None
        watch.first_byte_arrived()
        now = time.perf_counter()
        ctx.ttfb, ctx.attempt_ttfb = now - ctx.started, now - ctx.attempt_started
        ctx.upstream_wait += ctx.attempt_ttfb
        ctx.record_attempt(outcome_of(response.status))
        return response

    async def _relay(self, response: UpstreamResponse, is_event_stream: bool, ctx: RequestContext, send: Send) -> None:
        if response.status >= 400 and ctx.key is not None and (redactor := _redactor(ctx.key)).active:
            await self._relay_redacted(response, ctx, send, redactor)
            return
        strip_usage = ctx.injected_usage and is_event_stream
        # Stripping an event changes the length: the body then goes out chunked.
        headers = downstream_headers(response.raw_headers, keep_length=not strip_usage)
        reader = None
        if _counts_usage(self.resources.config) and response.status < 400:
            reader = UsageReader(event_stream=is_event_stream, encoding=response.header("content-encoding"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        sent = b"\n\n"  # the last chunk relayed: whether it closed its event matters to stripping and errors
        stepped_aside = False
        try:
            while True:
                waiting_since = time.perf_counter()
                chunk = await response.read_chunk()  # raw bytes: no decoding, no re-chunking
                if not chunk:
                    break
                ctx.upstream_wait += time.perf_counter() - waiting_since
                if strip_usage and carries_usage(chunk):
                    chunk, usage, event = without_usage_events(chunk, starts_an_event=_ends_an_event(sent))
                    if event is not None:
                        ctx.stripped_usage_event = event  # a cache stores the stream with it
                    if reader is not None and usage is not None:
                        reader.usage = usage  # parsed once: the reader sees only what is relayed
                    if not chunk:
                        continue  # a whole event, gone: the stream is still at an event's end
                    if reader is not None:
                        reader.feed(chunk)
                elif reader is not None:
                    reader.feed(chunk, without_usage=strip_usage)  # searched for usage just above
                if response.at_eof():  # the last chunk: it ends the response, one message fewer
                    _finish(reader, ctx)
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent = chunk
                if not stepped_aside:  # once the first chunk went out, layers step aside
                    send, stepped_aside = beyond_stepped_aside(send), True
        except httpx.HTTPError as exc:
            _finish(reader, ctx, complete=False)
            await self._break_off(map_httpx_error(exc), ctx, send, is_event_stream, _ends_an_event(sent))
            return
        except BaseException:
            _finish(reader, ctx, complete=False)
            raise
        _finish(reader, ctx)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_redacted(
        self, response: UpstreamResponse, ctx: RequestContext, send: Send, redactor: Redactor
    ) -> None:
        """An upstream error body with the deployment's keys replaced by their aliases. A body of up
        to `_WHOLE_ERROR_BODY` bytes is read whole first, so it keeps a right `content-length`; a
        longer one goes out chunked, through the redactor as it arrives."""
        headers = downstream_headers(response.raw_headers, keep_length=False)
        body, ended, started = b"", False, False
        try:
            while not ended and len(body) <= _WHOLE_ERROR_BODY:
                chunk = await response.read_chunk()
                body, ended = body + chunk, not chunk
            if ended:
                body = redactor.feed(body) + redactor.finish()
                headers.append((b"content-length", b"%d" % len(body)))
                await send({"type": "http.response.start", "status": response.status, "headers": headers})
                _finish(None, ctx)
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            started = True
            await send({"type": "http.response.body", "body": redactor.feed(body), "more_body": True})
            while chunk := await response.read_chunk():
                await send({"type": "http.response.body", "body": redactor.feed(chunk), "more_body": True})
        except httpx.HTTPError as exc:
            # Cut while its body arrived: what came goes out, and the connection closes unfinished.
            error = map_httpx_error(exc)
            ctx.outcome = error.outcome
            logger.warning("upstream error response broke off: %s", error.message)
            if not started:  # nothing went out yet: the client gets proxykit's own error instead
                await send_error_to(send, error, ctx.request_id)
            return
        _finish(None, ctx)
        await send({"type": "http.response.body", "body": redactor.finish(), "more_body": False})

    async def _break_off(
        self, error: ProxyError, ctx: RequestContext, send: Send, is_event_stream: bool, ended_cleanly: bool
    ) -> None:
        """The upstream failed after the response started: the status is gone, so say it in the body
        (SDKs raise on an error event) and end without the final message. The server then closes
        the connection, and a cut stream can never look complete."""
        ctx.outcome = error.outcome
        logger.warning("upstream response broke off after it started: %s", error.message)
        if is_event_stream:
            broken = UpstreamError(f"the upstream stream broke off: {error.message}")
            prefix = b"" if ended_cleanly else b"\n\n"
            event = prefix + b"data: " + broken.body(ctx.request_id) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})


def _redactor(key: KeyState) -> Redactor:
    return Redactor({
        upstream_key.secret.encode("latin-1"): upstream_key.alias.encode("latin-1")
        for upstream_key in key.deployment.api_keys
    })


def _is_event_stream(response: UpstreamResponse) -> bool:
    return (response.header("content-type") or "").startswith("text/event-stream")


def _ends_an_event(chunk: bytes) -> bool:
    return chunk.endswith((b"\n\n", b"\r\n\r\n"))


class _UpstreamRequest(NamedTuple):
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


def _finish(reader: UsageReader | None, ctx: RequestContext, *, complete: bool = True) -> None:
    """Usage read so far goes to the context; `finished` tells the disconnect watcher, and the
    limits and metrics, that the whole response went out."""
    if reader is not None:
        reader.finish()
        ctx.usage, ctx.sent_events = reader.usage, reader.events
    ctx.finished = complete


def _may_ask_for_usage(payload: dict[str, Any]) -> bool:
    """The client did not ask for usage itself, and its `stream_options` (if any) is an object
    proxykit can add to; any other value is the upstream's to refuse, passed on untouched."""
    options = payload.get("stream_options")
    return options is None or (isinstance(options, dict) and not options.get("include_usage"))


def _counts_usage(config: Config) -> bool:
    """Whether anything reads a response's usage: the metrics, or the store (budgets, stats)."""
    return config.metrics.enabled or config.store.enabled
