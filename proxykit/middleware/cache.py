"""The response cache as a layer: a hit is answered here, a miss goes on and its answer is stored.

It sits inside the rate limits (a hit counts against the client's `rpm`; its `tpm` reservation is
given back, as no upstream answered) and outside retry (only the answer the client got is stored,
never a failed attempt).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.body import add_defaults, ensure_payload, or_answer, requested_model, until_disconnect
from proxykit.cache.base import CACHEABLE_PATHS, CacheBackend, CacheEntry, CachePolicy, cache_key, pack_entry
from proxykit.config import ModelConfig
from proxykit.context import RequestContext, ensure_context
from proxykit.headers import adding_headers, set_response_headers
from proxykit.paths import route_path
from proxykit.usage.accounting import TokenCounts
from proxykit.usage.reader import without_usage_events

logger = logging.getLogger(__name__)

_DONE = b"data: [DONE]"
_MISS = ((b"x-proxykit-cache", b"miss"),)


class CacheMiddleware:
    """Exact-match cache of chat completions, completions and embeddings (CONTRACT section 10).

        Middleware(CacheMiddleware, backend=MemoryCache(max_bytes=2**28), ttl=3600,
                   shared_between_clients=False, max_body_bytes=20_000_000, max_entry_bytes=2**28 // 10,
                   resolve=functools.partial(resolve_model, config))
    """

    def __init__(
        self, app: ASGIApp, *, backend: CacheBackend, ttl: float, shared_between_clients: bool,
        max_body_bytes: int, max_entry_bytes: int, resolve: Callable[[str, tuple[str, ...] | None], ModelConfig],
    ) -> None:
        self.app = app
        self.resolve = resolve  # the model a request names, if its client may use it (else it raises)
        self.backend = backend
        self.ttl = ttl
        self.shared = shared_between_clients
        self.max_body_bytes = max_body_bytes
        self.max_entry_bytes = max_entry_bytes
        # Identical non-streaming misses in flight: the first asks the upstream, the others wait on
        # a future made once one does. Most misses are alone, and asking for the running loop
        # to make one costs a system call on Python 3.11 (getpid).
        self._leaders: dict[str, asyncio.Future[CacheEntry | None] | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or (path := route_path(scope)) not in CACHEABLE_PATHS:
            await self.app(scope, receive, send)
            return
        ctx = ensure_context(scope)
        payload = await or_answer(self._payload(scope, receive, ctx), scope, receive, send)
        if payload is None:
            return
        policy = CachePolicy.of(_header(scope, b"cache-control"))
        if not policy.store:
            ctx.cache = "bypass"
            await self.app(scope, receive, adding_headers(send, [(b"x-proxykit-cache", b"bypass")]))
            return
        key = cache_key(client=None if self.shared else ctx.client, path=path, payload=payload)
        streamed = payload.get("stream") is True
        if policy.look:
            entry = await self.backend.get(key)
            if entry is None and not streamed and key in self._leaders:
                entry = await _unless_disconnected(self._leaders_answer(key), receive, ctx)
                if ctx.disconnected:
                    return
            if entry is not None and entry.fresh(self.ttl, policy.max_age):
                await _replay(entry, ctx, _asks_for_usage(payload), send)
                return
        await self._miss(key, streamed, ctx, scope, receive, send)

    def _leaders_answer(self, key: str) -> asyncio.Future[CacheEntry | None]:
        leader = self._leaders[key]
        if leader is None:
            leader = self._leaders[key] = asyncio.get_running_loop().create_future()
        return leader

    async def _payload(self, scope: Scope, receive: Receive, ctx: RequestContext) -> dict[str, Any]:
        """The body, once its model is known and allowed: a cached answer is no way around an
        allow-list, and a hit is counted under its model."""
        await ensure_payload(scope, receive, self.max_body_bytes)
        model = self.resolve(requested_model(ctx), ctx.allowed_models)
        if ctx.model != model.name:
            ctx.set_model(model.name)
        add_defaults(ctx, model.defaults)  # the key is of the body the upstream would get
        assert ctx.payload is not None
        return ctx.payload

    async def _miss(
        self, key: str, streamed: bool, ctx: RequestContext, scope: Scope, receive: Receive, send: Send,
    ) -> None:
        ctx.cache = "miss"
        leads = not streamed and key not in self._leaders
        if leads:
            self._leaders[key] = None
        capture = _Capture(self.max_entry_bytes, send)
        packed = None
        try:
            await self.app(scope, receive, capture.send)
            if not ctx.disconnected:
                packed = capture.packed(ctx, streamed)
            if packed is not None:
                await self.backend.set(key, packed, self.ttl)
        finally:
            if leads:
                leader = self._leaders.pop(key)
                if leader is not None and not leader.done():
                    leader.set_result(None if packed is None else CacheEntry.unpack(packed))


class _Capture:
    """Sends one answer on, marked a miss, and keeps what it sent, bounded: whether it is worth
    storing is known only at its end."""

    def __init__(self, limit: int, send: Send) -> None:
        self.limit = limit
        self._send = send
        self.status = 0
        self.content_type = b""
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            for name, value in message.get("headers", ()):
                if name == b"content-type":
                    self.content_type = value
                elif name == b"content-encoding" and value != b"identity":
                    self.size = self.limit + 1  # compressed for this client's Accept-Encoding: not for every client
            set_response_headers(message, _MISS)
        elif self.status == 200 and self.size <= self.limit:  # else not stored: nothing more to keep
            if chunk := message.get("body", b""):
                self.chunks.append(chunk)
                self.size += len(chunk)
            if not message.get("more_body", False):
                self.complete = True  # a cut stream never sends its last message
        await self._send(message)

    def packed(self, ctx: RequestContext, streamed: bool) -> bytes | None:
        if not self.complete or self.status != 200 or self.size > self.limit:
            return None
        chunks = self.chunks
        if streamed and ctx.stripped_usage_event is not None:
            chunks = _with_usage_event(chunks, ctx.stripped_usage_event + b"\n\n")
        tokens = ctx.usage_counts()
        return pack_entry(self.status, self.content_type, chunks, streamed, tokens.prompt, tokens.completion,
                          time.time())


def _with_usage_event(chunks: list[bytes], event: bytes) -> list[bytes]:
    """The stream as the upstream sent it: the usage event proxykit took out, back before `[DONE]`."""
    for i in range(len(chunks) - 1, -1, -1):
        at = chunks[i].find(_DONE)
        if at >= 0:
            before, after = chunks[i][:at], chunks[i][at:]
            return [*chunks[:i], *(part for part in (before, event, after) if part), *chunks[i + 1:]]
    return [*chunks, event]


async def _replay(entry: CacheEntry, ctx: RequestContext, asks_for_usage: bool, send: Send) -> None:
    """The stored answer: its status, content type and body, a stream event by event as it came."""
    ctx.cache, ctx.cache_saved_tokens = "hit", entry.tokens
    ctx.cache_hit_tokens = TokenCounts(prompt=entry.prompt_tokens, completion=entry.completion_tokens)
    chunks = list(entry.chunks)
    if entry.stream and not asks_for_usage:
        chunks = [kept for chunk in chunks if (kept := without_usage_events(chunk, starts_an_event=True)[0])]
    headers = [
        (b"content-type", entry.content_type), (b"x-proxykit-cache", b"hit"),
        (b"age", b"%d" % int(entry.age())), (b"x-proxykit-attempts", b"cache"),
    ]
    if not entry.stream:
        headers.append((b"content-length", b"%d" % sum(map(len, chunks))))
    await send({"type": "http.response.start", "status": entry.status, "headers": headers})
    for i, chunk in enumerate(chunks):
        await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
    if not chunks:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _unless_disconnected(
    leader: asyncio.Future[CacheEntry | None], receive: Receive, ctx: RequestContext,
) -> CacheEntry | None:
    """The leader's answer, or None when the client leaves first."""
    watch: asyncio.Future[Any] = asyncio.ensure_future(until_disconnect(receive))
    try:
        done, _ = await asyncio.wait({leader, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if leader in done:
        return leader.result()
    ctx.disconnected = True
    return None


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _asks_for_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))
