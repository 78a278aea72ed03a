"""A deterministic OpenAI-compatible upstream: chat (streamed or not, tool calls, reasoning),
completions, embeddings and a model list, with no network and no model.

    upstream = DemoUpstream(delay=0.05)   # an ASGI app; streamed events come `delay` s apart
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

DEMO_MODELS: Final = ("demo-chat", "demo-reasoner", "demo-embed", "demo-flaky")
RATE_LIMITED_KEY: Final = "demo-upstream-key-429"  # always answered with 429: shows key rotation
CREATED: Final = 1_700_000_000  # fixed, so that replies are byte-for-byte repeatable


class DemoUpstream:
    """The demo upstream as an ASGI app. Models whose name contains "reason" also send
    `reasoning_content`; a request with `tools` gets a call to the first tool; a request made
    with the key `demo-upstream-key-429` gets a 429, as a provider's exhausted key would."""

    def __init__(self, *, delay: float = 0.05) -> None:
        self.delay = delay
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    async def chat(self, request: Request) -> Response:
        if request.headers.get("authorization", "").endswith(RATE_LIMITED_KEY):
            error = {"message": "rate limit reached for this key", "type": "requests", "code": "rate_limit_exceeded"}
            return JSONResponse({"error": error}, status_code=429, headers={"retry-after": "30"})
        body = await _json(request)
        if isinstance(body, Response):
            return body
        model = str(body.get("model", "demo-chat"))
        prompt = _last_user_text(body.get("messages"))
        reply = Reply(
            ident="chatcmpl-" + _digest(json.dumps(body, sort_keys=True))[:24],
            model=model,
            prompt_tokens=_tokens(json.dumps(body.get("messages", ""))),
            text=f"Hello from the proxykit demo upstream. You said: {prompt[:200]}",
            reasoning=f"The user wrote {len(prompt.split())} words." if "reason" in model else None,
            tool=_first_tool(body),
        )
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._events(reply.chunks(include_usage)), media_type="text/event-stream")
        return JSONResponse(reply.completion())

    async def completions(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        prompt = str(body.get("prompt", ""))
        text = f"Hello from the proxykit demo upstream. You wrote: {prompt[:200]}"
        return JSONResponse({
            "id": "cmpl-" + _digest(prompt)[:24], "object": "text_completion", "created": CREATED,
            "model": body.get("model"),
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": _usage(_tokens(prompt), _tokens(text)),
        })

    async def embeddings(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        inputs = body.get("input", "")
        texts = [inputs] if isinstance(inputs, str) else [str(item) for item in inputs]
        size = int(body.get("dimensions") or 8)
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(text, size)} for i, text in enumerate(texts)
        ]
        tokens = sum(_tokens(text) for text in texts)
        return JSONResponse({
            "object": "list", "data": data, "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    async def models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": CREATED, "owned_by": "demo"} for name in DEMO_MODELS]
        return JSONResponse({"object": "list", "data": data})

    async def _events(self, chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(chunks):
            if i:
                await anyio.sleep(self.delay)  # real spacing, so the demo shows streaming
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"


class Reply:
    """One chat reply, rendered whole or as stream chunks."""

    def __init__(
        self, *, ident: str, model: str, prompt_tokens: int, text: str,
        reasoning: str | None, tool: dict[str, Any] | None,
    ) -> None:
        self.ident, self.model, self.prompt_tokens = ident, model, prompt_tokens
        self.text, self.reasoning, self.tool = text, reasoning, tool

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool else "stop"

    def usage(self) -> dict[str, Any]:
        completion = _tokens(self.text if not self.tool else json.dumps(self.tool))
        reasoning = _tokens(self.reasoning or "")
        usage = _usage(self.prompt_tokens, completion + reasoning)
        if self.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return usage

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None if self.tool else self.text}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool:
            message["tool_calls"] = [self.tool]
        return {
            "id": self.ident, "object": "chat.completion", "created": CREATED, "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}],
            "usage": self.usage(),
        }

    def chunks(self, include_usage: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{"reasoning_content": word} for word in _pieces(self.reasoning or "")]
        if self.tool:
            name_only = {**self.tool, "function": {"name": self.tool["function"]["name"], "arguments": ""}}
            deltas.append({"tool_calls": [{"index": 0, **name_only}]})
            deltas += [
                {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                for piece in _pieces(self.tool["function"]["arguments"])
            ]
        else:
            deltas += [{"content": word} for word in _pieces(self.text)]
        chunks = [self._chunk(delta, None) for delta in deltas]
        chunks.append(self._chunk({}, self.finish_reason))
        if include_usage:
            chunks.append({**self._chunk({}, None), "choices": [], "usage": self.usage()})
        return chunks

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": self.ident, "object": "chat.completion.chunk", "created": CREATED, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }


async def _json(request: Request) -> dict[str, Any] | Response:
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        error = {"message": "body must be a JSON object", "type": "invalid_request_error", "code": None}
        return JSONResponse({"error": error}, status_code=400)
    return body


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            return str(content or "")
    return ""


def _first_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or body.get("tool_choice") == "none":
        return None
    function = tools[0].get("function", {}) if isinstance(tools[0], dict) else {}
    required = (function.get("parameters") or {}).get("required") or []
    arguments = json.dumps({name: "demo" for name in required})
    return {
        "id": "call_" + _digest(json.dumps(function, sort_keys=True))[:16], "type": "function",
        "function": {"name": function.get("name", "tool"), "arguments": arguments},
    }


def _pieces(text: str) -> list[str]:
    """Words with their trailing space, so the pieces join back to `text` exactly."""
    words = text.split(" ")
    return [word + " " for word in words[:-1]] + ([words[-1]] if words[-1] else [])


def _tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _vector(text: str, size: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % len(digest)] - 127.5) / 127.5, 6) for i in range(size)]


def demo_config(base_url: str) -> dict[str, Any]:
    """A config that puts every demo model in front of the demo upstream at `base_url`."""
    keys = ["demo-upstream-key-0", "demo-upstream-key-1"]
    models: list[dict[str, Any]] = [
        {"name": name, "pricing": {"input_per_1m": 0.1, "output_per_1m": 0.4}, "deployments": [{
            "base_url": base_url, "max_tokens": 4096,
            "api_keys": [RATE_LIMITED_KEY, *keys] if name == "demo-flaky" else keys,
        }]}
        for name in DEMO_MODELS
    ]
    return {"models": models, "retry": {"backoff": {"initial": 0.05, "max": 1.0}}}
