"""`POST {management.path}/generate` and `/generate/stream`: the seed service's generation API,
forwarded as a chat completion through every layer (auth, budget, limits, cache, retry,
rotation, metrics, store) like any other request.

    {"model": "m", "messages": [...], "parameters": {"temperature": 0.7, "stream": false}}
    -> the chat completion, plus "cost": {"input_cost", "output_cost", "total_cost"}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

from starlette.types import Message, Receive, Scope, Send

from proxykit.body import ensure_payload, or_answer, replay
from proxykit.config import Pricing
from proxykit.context import RequestContext, ensure_context
from proxykit.errors import InvalidRequest, ProxyError
from proxykit.live import Live
from proxykit.respond import send_error
from proxykit.usage import accounting

# The largest non-streamed answer whose cost is added to it; a larger one passes as it came.
MAX_ANSWER_BYTES: Final = 32 * 1024 * 1024
_NOT_PARAMETERS: Final = frozenset({"model", "messages", "stream"})


class GenerateEndpoint:
    """An ASGI endpoint: turns the request into a chat completion for `forwarding`.

        Route("/generate", GenerateEndpoint(live, stream=False, check=management.check))
    """

    def __init__(self, live: Live, *, stream: bool, check: Callable[[Scope], object]) -> None:
        self.live = live  # the forwarding layers and the pricing of the running config
        self.stream = stream
        self.check = check  # raises AdminOnly for a caller the management API does not answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            self.check(scope)
        except ProxyError as exc:
            await send_error(exc, scope, receive, send)
            return
        config = self.live.config
        payload = await or_answer(ensure_payload(scope, receive, config.limits.max_body_bytes), scope, receive, send)
        if payload is None:
            return
        try:
            chat = chat_completion_body(payload, stream=self.stream)
        except InvalidRequest as exc:
            await send_error(exc, scope, receive, send)
            return
        ctx = ensure_context(scope)
        ctx.payload, ctx.body = chat, json.dumps(chat).encode()
        streamed = chat["stream"] is True
        headers = [(name, value) for name, value in scope["headers"]
                   if name not in (b"content-length", b"accept-encoding")]
        if not streamed:  # the answer is read to add its cost: it must come as plain JSON
            headers.append((b"accept-encoding", b"identity"))
        inner = {**scope, "path": "/chat/completions", "raw_path": b"/chat/completions", "root_path": "",
                 "query_string": b"", "headers": headers}
        forwarding = self.live.forwarding
        assert forwarding is not None, "the app's layers are built before its first request"
        await forwarding(inner, replay(ctx.body, receive), send if streamed else self._with_cost(send, ctx))

    def _with_cost(self, send: Send, ctx: RequestContext) -> Send:
        """A send that holds a plain answer until it is whole, then adds its cost."""
        start: Message | None = None
        chunks: list[bytes] = []
        size = 0
        passing = False  # too large, or not an answer to price: what comes goes on unchanged

        async def send_with_cost(message: Message) -> None:
            nonlocal start, size, passing
            if message["type"] == "http.response.start":
                start = message
                passing = message["status"] != 200
                if passing:
                    await send(message)
                return
            if passing or start is None:
                await send(message)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if message.get("more_body", False):
                if size > MAX_ANSWER_BYTES:
                    passing = True
                    await send(start)
                    await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                return
            model = self.live.config.model(ctx.served_by or ctx.model)
            body = _priced(b"".join(chunks), model.pricing if model is not None else None)
            headers = [(name, value) for name, value in start["headers"] if name != b"content-length"]
            headers.append((b"content-length", b"%d" % len(body)))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return send_with_cost


def _priced(body: bytes, pricing: Pricing | None) -> bytes:
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(answer, dict):
        return body
    answer["cost"] = cost_of(answer.get("usage"), pricing)
    return json.dumps(answer).encode()


def chat_completion_body(payload: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
    """The chat completion a generation request stands for; raises InvalidRequest naming the field."""
    model, messages, parameters = payload.get("model"), payload.get("messages"), payload.get("parameters", {})
    if not isinstance(model, str) or not model:
        raise InvalidRequest("the request body must name a \"model\"")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("\"messages\" must be a non-empty list")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("\"parameters\" must be an object")
    body = {key: value for key, value in parameters.items() if key not in _NOT_PARAMETERS}
    body.update(model=model, messages=messages, stream=stream or parameters.get("stream") is True)
    return body


def cost_of(usage: Any, pricing: Pricing | None) -> dict[str, float]:
    tokens = accounting.counts(usage if isinstance(usage, Mapping) else None)
    prices = pricing or Pricing()
    input_cost = tokens.prompt * prices.input_per_1m / 1e6
    output_cost = tokens.completion * prices.output_per_1m / 1e6
    return {"input_cost": round(input_cost, 10), "output_cost": round(output_cost, 10),
            "total_cost": round(input_cost + output_cost, 10)}
