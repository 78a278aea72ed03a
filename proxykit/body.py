"""The request body: read once and bounded, parsed once, replayed to each attempt."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
from starlette.types import Message, Receive, Scope, Send

from proxykit.context import RequestContext, ensure_context
from proxykit.errors import InvalidRequest, ProxyError, RequestTooLarge
from proxykit.respond import send_error

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client left while its request body was still arriving."""


async def or_answer(step: Awaitable[T], scope: Scope, receive: Receive, send: Send) -> T | None:
    """Runs a step that reads or checks the request. None means the request is over: its client
    error was answered (OpenAI-shaped), or the client left while its body was arriving."""
    try:
        return await step
    except ClientDisconnected:
        ensure_context(scope).disconnected = True
    except ProxyError as exc:
        await send_error(exc, scope, receive, send)
    return None


async def ensure_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    """The whole request body, read on first use; raises `RequestTooLarge` past `max_bytes`."""
    ctx = ensure_context(scope)
    if ctx.body is None:
        ctx.body = await _read_bounded(scope, receive, max_bytes)
    return ctx.body


async def _read_bounded(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            # Refuse before reading: a client announcing 1 GB is not made to upload it.
            if value.isdigit() and (len(value) > 19 or int(value) > max_bytes):  # 19 digits: past any size
                raise _too_large(max_bytes)
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:  # a chunked upload has no Content-Length to check up front
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(max_bytes: int) -> RequestTooLarge:
    return RequestTooLarge(f"the request body is larger than the limit of {max_bytes} bytes")


async def ensure_payload(scope: Scope, receive: Receive, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, parsed on first use; raises `InvalidRequest` otherwise."""
    ctx = ensure_context(scope)
    if ctx.payload is None:
        ctx.payload = parse_payload(await ensure_body(scope, receive, max_bytes))
    return ctx.payload


def parse_payload(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("the request needs a JSON body with a \"model\" field")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return payload


def add_defaults(ctx: RequestContext, defaults: tuple[tuple[str, object], ...]) -> None:
    """The model's body defaults (`defaults`, or a management API's `parameters`), each added
    only when the client sent no such member: defaults, never caps."""
    if not defaults or ctx.payload is None or ctx.body is None:
        return
    missing = {name: value for name, value in defaults if name not in ctx.payload}
    if missing:
        ctx.body = with_members(ctx.body, ctx.payload, missing)
        ctx.payload = {**ctx.payload, **missing}


def with_members(body: bytes, payload: dict[str, Any], changes: dict[str, Any]) -> bytes:
    """The body with `changes` made. Members the body does not have yet go in before its closing
    brace, and the client's own bytes stay as they came: encoding a long conversation again costs
    more than the rest of the request, and escapes every non-ASCII character. A member the body has
    already means encoding it again (no duplicate keys)."""
    if changes.keys().isdisjoint(payload) and payload:
        end = body.rstrip()
        # A body in UTF-16 or UTF-32 (JSON allows them) has a zero byte beside one brace or both.
        if end.endswith(b"}") and body.lstrip().startswith(b"{"):
            return end[:-1] + b"," + json.dumps(changes).encode()[1:]
    return json.dumps({**payload, **changes}).encode()


def requested_model(ctx: RequestContext) -> str:
    model = (ctx.payload or {}).get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("the request body must name a \"model\"")
    return model


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields `body` once, then only what the real `receive` brings next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay_receive() -> Message:
        if pending:
            return pending.pop()
        while (message := await receive())["type"] == "http.request":
            pass  # an outer replay's copy of the body: after the body, only a disconnect is news
        return message

    return replay_receive


async def until_disconnect(receive: Receive) -> None:
    """Returns once the client has gone. uvicorn's send() is a silent no-op after a disconnect,
    so `receive` is the only place to learn it."""
    while (await receive())["type"] != "http.disconnect":
        pass  # an outer replay's copy of the body


async def wait_unless_disconnected(seconds: float, receive: Receive, ctx: RequestContext) -> bool:
    """Waits `seconds`, or less if the client leaves first; True when it left."""
    with anyio.move_on_after(seconds):
        await until_disconnect(receive)
        ctx.disconnected = True
    return ctx.disconnected
