"""What a cache miss costs the response cache's layer a request, in process.

    python -m tests.benchmarks.cache_layer [--requests 20000] [--rounds 15]

`CacheMiddleware` (a 1 MiB memory cache) around an app that answers a ~1 KB completion at once,
against an app that only reads and parses the body the same way and answers: the difference is
the miss's own work (the model check, the policy, the key, the lookup, the capture, packing and
storing the answer). Every request is a body never sent before, so every one is a miss. Prints
the least and the median of the rounds, in µs a request. Pin it to one core (`taskset -c 0`).
"""

from __future__ import annotations

import functools
import itertools
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.body import ensure_payload
from proxykit.cache.memory import MemoryCache
from proxykit.config.reader import config_from_dict
from proxykit.context import ensure_context
from proxykit.middleware.cache import CacheMiddleware
from proxykit.routing import resolve_model
from tests.benchmarks.in_process import from_command_line, report

MAX_BODY = 20_000_000
CONFIG = config_from_dict({"models": [{"name": "bench", "deployments": [{"base_url": "http://upstream/v1",
                                                                          "api_keys": ["k"]}]}]})
ANSWER = json.dumps({"id": "bench", "choices": [{"message": {"content": "a" * 900}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]


async def answered(scope: Scope, receive: Receive, send: Send) -> None:
    """The upstream's answer, with its usage on the context as the forwarder leaves it."""
    ensure_context(scope).usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    await send({"type": "http.response.start", "status": 200, "headers": list(HEADERS)})
    await send({"type": "http.response.body", "body": ANSWER, "more_body": False})


async def parsed_and_answered(scope: Scope, receive: Receive, send: Send) -> None:
    await ensure_payload(scope, receive, MAX_BODY)
    await answered(scope, receive, send)


async def per_request(app: ASGIApp, bodies: list[bytes]) -> float:
    async def send(message: Message) -> None:
        pass

    started = time.perf_counter()
    for body in bodies:
        messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive(messages: list[Message] = messages) -> Message:
            return messages.pop() if messages else {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "/v1",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]}
        await app(scope, receive, send)
    return (time.perf_counter() - started) / len(bodies)


async def main(requests: int, rounds: int) -> None:
    users = itertools.count()

    def new_bodies() -> list[bytes]:
        return [json.dumps({"model": "bench", "user": str(next(users)),
                            "messages": [{"role": "user", "content": "hello"}]}).encode() for _ in range(requests)]

    cache = CacheMiddleware(answered, backend=MemoryCache(max_bytes=2**20), ttl=3600, shared_between_clients=False,
                            max_body_bytes=MAX_BODY, max_entry_bytes=2**20 // 10,
                            resolve=functools.partial(resolve_model, CONFIG))
    costs = []
    for _ in range(rounds):
        with_layer = await per_request(cache, new_bodies())
        alone = await per_request(parsed_and_answered, new_bodies())
        costs.append((with_layer - alone) * 1e6)
    report("a cache miss", costs, requests)


if __name__ == "__main__":
    from_command_line(__doc__, main, requests=20_000, rounds=15)
