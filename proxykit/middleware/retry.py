"""Retry: another attempt, on another key, until one answers or the budget is spent."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxykit.body import ensure_body, or_answer, replay, wait_unless_disconnected
from proxykit.config import Config
from proxykit.context import RequestContext, ensure_context
from proxykit.durations import retry_after
from proxykit.headers import set_response_headers
from proxykit.outcomes import CONNECTION_FAILURES, Outcome
from proxykit.sends import step_aside

logger = logging.getLogger(__name__)

_HELD_BODY_LIMIT = 64 * 1024  # an error body held while deciding; anything larger is passed on
_MIN_KEY_WAIT = 0.01  # a key "back in 0 s" that still cannot be chosen must not make a busy loop
_MAX_KEY_WAITS = 20  # waits for a resting key in one request: a bound, should keys keep slipping away


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how soon to try again.

        RetryPolicy(attempts=3, initial=0.2, max_delay=8.0, retry_on=frozenset({429, 500, "timeout"}))
    """

    attempts: int = 3  # after the first
    initial: float = 0.2
    max_delay: float = 8.0
    retry_on: frozenset[int | str] = frozenset({429, 500, 502, 503, 504, "connect_error", "timeout"})
    deadline: float = 120.0  # no attempt starts this long after the request arrived

    @classmethod
    def from_config(cls, config: Config) -> RetryPolicy:
        retry = config.retry
        return cls(
            attempts=retry.attempts, initial=retry.backoff.initial, max_delay=retry.backoff.max,
            retry_on=frozenset(retry.retry_on), deadline=config.timeouts.first_byte,
        )

    def retryable(self, status: int, outcome: Outcome | None) -> bool:
        if outcome is None:
            return False  # proxykit answered by itself: no upstream was asked
        if outcome in CONNECTION_FAILURES:
            return outcome in self.retry_on
        # An upstream 401/403 is the key's fault, so another key is always worth a try.
        return status in (401, 403) or status in self.retry_on

    def delay(self, retry: int, status: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter. A 429's Retry-After is honoured by resting that key,
        not by waiting: the next attempt goes to another key. Other statuses (a 503 from an
        overloaded upstream) wait for Retry-After, up to `max_delay`."""
        ceiling: float = min(self.max_delay, self.initial * 2.0**retry)
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None and status != 429:
            delay = max(delay, retry_after)
        return min(delay, self.max_delay)


@dataclass(slots=True)
class _Held:
    """A failed attempt's response, held back while proxykit decides whether to try again."""

    start: Message
    body: list[Message] = field(default_factory=list)
    size: int = 0

    def retry_after(self) -> float | None:
        return retry_after(MutableHeaders(scope=self.start))


class _Retry(Exception):
    """Abandons an attempt from inside `send`, so the inner layers close its upstream response."""


class _NoKeyLeft(Exception):
    """The next attempt found no key: the client gets the last upstream error instead."""


class RetryMiddleware:
    """Decides on each attempt's `http.response.start`: a retryable failure is held back and the
    request tried again (the key rotation layer inside picks another key); once a response has
    started reaching the client, it is final.

        Middleware(RetryMiddleware, policy=RetryPolicy(), max_body_bytes=20_000_000)
    """

    def __init__(self, app: ASGIApp, *, policy: RetryPolicy, max_body_bytes: int) -> None:
        self.app = app
        self.policy = policy
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = ensure_context(scope)
        body = await or_answer(ensure_body(scope, receive, self.max_body_bytes), scope, receive, send)
        if body is None:
            return
        held: _Held | None = None
        attempt_number = 0
        while attempt_number <= self.policy.attempts:
            ctx.attempt, ctx.no_upstream = attempt_number, False
            attempt = _Attempt(self.policy, ctx, send, after_failure=held is not None)
            try:
                await self.app(scope, replay(body, receive), attempt)
            except _Retry:
                pass
            except _NoKeyLeft:
                # Every key rests: wait for the soonest if it returns in time. No upstream was
                # asked, so the attempt is not spent.
                if not await self._wait_for_a_key(ctx, receive):
                    break
                continue
            if attempt.held is None:
                return  # answered: the response went to the client
            held = attempt.held  # failed, or broke off while its error body was held
            if ctx.disconnected:
                return  # a client that left is never retried
            delay = self.policy.delay(attempt_number, held.start["status"], held.retry_after())
            if not await self._wait(delay, ctx, receive):
                break
            attempt_number += 1
        if ctx.disconnected:
            return
        assert held is not None
        logger.warning("retries exhausted: %s", ctx.attempts_header())
        await _replay_held(held, send)

    async def _wait_for_a_key(self, ctx: RequestContext, receive: Receive) -> bool:
        """Waits for the soonest resting key when it returns within `max_delay` and the deadline;
        False when it does not (or the client left)."""
        wait = ctx.next_key_in
        ctx.key_waits += 1
        if wait is None or wait > self.policy.max_delay or ctx.key_waits > _MAX_KEY_WAITS:
            return False
        return await self._wait(max(wait, _MIN_KEY_WAIT), ctx, receive)

    async def _wait(self, delay: float, ctx: RequestContext, receive: Receive) -> bool:
        """Waits `delay` seconds before another attempt; False when that would pass the deadline
        or the client left meanwhile."""
        if time.perf_counter() + delay > ctx.started + self.policy.deadline:
            return False
        waited_from = time.perf_counter()
        left = await wait_unless_disconnected(delay, receive, ctx)
        ctx.backoff_wait += time.perf_counter() - waited_from
        return not left


class _Attempt:
    """The `send` of one attempt: holds back a retryable failure, passes anything else on."""

    def __init__(self, policy: RetryPolicy, ctx: RequestContext, send: Send, *, after_failure: bool) -> None:
        self.policy = policy
        self.ctx = ctx
        self._send = send
        self.after_failure = after_failure
        self.held: _Held | None = None

    async def __call__(self, message: Message) -> None:
        ctx = self.ctx
        if message["type"] == "http.response.start":
            if ctx.no_upstream and self.after_failure:
                raise _NoKeyLeft()
            final = ctx.attempt >= self.policy.attempts
            if not final and not ctx.disconnected and self.policy.retryable(message["status"], ctx.outcome):
                self.held = _Held(message)
                return
            if ctx.attempt and message["status"] >= 400:
                _mark_retried(message)
            step_aside(self, self._send)  # from here on the attempt is committed: nothing to hold
            await self._send(message)
        elif self.held is not None:
            held = self.held
            held.body.append(message)
            held.size += len(message.get("body", b""))
            if not message.get("more_body", False):
                raise _Retry()
            if held.size > _HELD_BODY_LIMIT:  # too large to hold: it goes to the client as it is
                self.held = None
                await _replay_held(held, self._send)
        else:
            await self._send(message)


def _mark_retried(start: Message) -> None:
    # proxykit already retried: SDK clients must not multiply the load by retrying again.
    set_response_headers(start, [(b"x-should-retry", b"false")])


async def _replay_held(held: _Held, send: Send) -> None:
    _mark_retried(held.start)
    await send(held.start)
    for message in held.body:
        await send(message)
