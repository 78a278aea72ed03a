"""`send` wrappers that step aside for the rest of a response once they have seen what they need.

Every proxykit layer wraps `send` to look at a response's start (the metrics layer also at its
first body chunk). Each chunk of a long stream would still pass through all of them, a
coroutine call per layer per event: enough, with many concurrent streams, for events to queue
up and reach the client two to a read. A wrapper that passes the rest of a response on unchanged says so with
`step_aside`, and the forwarder sends the rest of the body past it. A wrapper that is not
proxykit's never says so, so whatever it does to a body still happens.

    async def send_with_id(message): ...
    step_aside(send_with_id, send)     # it only ever looks at the start
    send = beyond_stepped_aside(send)  # in the forwarder, once the first chunk went out
"""

from __future__ import annotations

from starlette.types import Send

_PASSES_TO = "proxykit_passes_to"


def step_aside(wrapper: object, to: Send) -> None:
    """From now on, `wrapper` passes every message of this response to `to` unchanged."""
    setattr(wrapper, _PASSES_TO, to)


def beyond_stepped_aside(send: Send) -> Send:
    """The first send, from `send` outwards, that has not stepped aside."""
    while (to := getattr(send, _PASSES_TO, None)) is not None:
        send = to
    return send
