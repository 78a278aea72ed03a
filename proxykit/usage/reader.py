"""Token usage read from response bodies as they pass, never holding or altering what is relayed.

    reader = UsageReader(event_stream=True, encoding=None)
    for chunk in body:
        reader.feed(chunk)       # a look at a copy; `chunk` goes on unchanged
    reader.finish()
    reader.usage                 # {"prompt_tokens": ..., "completion_tokens": ..., ...} or None
                                 # (Responses API names are mapped to these)
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Any, Final

logger = logging.getLogger(__name__)

# What counting usage may hold per request, whatever the upstream sends. Past a cap the reader
# stops counting (never relaying): the request is then counted by the estimate.
MAX_JSON_BODY: Final = 1024 * 1024  # a plain body: kept whole up to this, then only its tail
JSON_TAIL: Final = 64 * 1024  # the tail of a larger body, where OpenAI-style bodies put `usage`
MAX_LINE: Final = 1024 * 1024  # an unfinished event-stream line (a Responses API `response.completed` is long)
MAX_INFLATED: Final = 64 * 1024 * 1024  # all a compressed body may inflate to while it is read
_INFLATE_STEP: Final = 64 * 1024  # inflated in pieces of this size: a small input may inflate hugely
USAGE_KEY: Final = b'"usage"'


class UsageReader:
    """Finds the `usage` object of an OpenAI-style response: the last `data:` event that carries
    one in a stream (in a Responses API stream, the response in its last event), or the
    top-level field of a JSON body. Keeps only an unfinished line (streams) or a bounded copy of
    the body (plain JSON), each under its cap."""

    def __init__(self, *, event_stream: bool, encoding: str | None) -> None:
        self.event_stream = event_stream
        self.usage: dict[str, Any] | None = None
        self.events = 0  # data events seen, [DONE] excluded
        self.stopped = False  # past a cap: nothing more is looked at
        self._line = b""
        self._body: bytearray | None = None if event_stream else bytearray()
        self._tail_only = False  # the body passed MAX_JSON_BODY: `_body` holds its last JSON_TAIL bytes
        self._inflate = _decompressor(encoding)
        self._inflated = 0

    def feed(self, chunk: bytes, *, without_usage: bool = False) -> None:
        """Looks at the next chunk. `without_usage`: the caller searched `chunk` for a usage
        object already and found none."""
        if self.stopped:
            return
        if self._inflate is not None:
            self._feed_compressed(chunk)
            return
        self._look_at(chunk, without_usage)

    def _feed_compressed(self, chunk: bytes) -> None:
        inflate = self._inflate
        assert inflate is not None
        while True:
            try:
                piece = inflate.decompress(chunk, _INFLATE_STEP)
            except zlib.error:
                self._stop("the compressed body is not readable")
                return
            self._inflated += len(piece)
            if self._inflated > MAX_INFLATED:
                self._stop(f"the body inflates to more than {MAX_INFLATED} bytes")
                return
            if piece:
                self._look_at(piece, False)  # the caller saw compressed bytes: nothing searched yet
            if self.stopped:
                return
            chunk = inflate.unconsumed_tail
            if not chunk and len(piece) < _INFLATE_STEP:  # a full piece may leave output pending
                return

    def _stop(self, why: str) -> None:
        logger.debug("usage is not counted for this response: %s", why)
        self.stopped, self._line, self._body, self._inflate = True, b"", None, None

    def _look_at(self, chunk: bytes, without_usage: bool) -> None:
        if self.event_stream:
            if self._line:  # an unfinished line before: the chunk completes it
                chunk, without_usage = self._line + chunk, False
            if chunk.endswith(b"\n") and (without_usage or not carries_usage(chunk)) and chunk.find(b"[DONE]") < 0:
                # The usual chunk: whole events without usage, counted in place, since copying
                # and splitting lines would cost more than relaying them. A raw newline cannot
                # occur inside an event's JSON. (`find`, not `in`: the faster on bytes.)
                self._line = b""
                self.events += chunk.count(b"\ndata:") + chunk.startswith(b"data:")
                return
            whole = chunk.rfind(b"\n") + 1
            if whole == 0 and len(chunk) > MAX_LINE:
                self._stop(f"an event-stream line is longer than {MAX_LINE} bytes")
                return
            self._line = chunk[whole:]  # an unfinished line waits for the rest
            if len(self._line) > MAX_LINE:
                self._stop(f"an event-stream line is longer than {MAX_LINE} bytes")
                return
            self._scan_lines(chunk[:whole])
        elif self._body is not None:
            self._body += chunk
            if len(self._body) > MAX_JSON_BODY or (self._tail_only and len(self._body) > 2 * JSON_TAIL):
                self._tail_only = True  # usage is a body's last member in OpenAI's shape: keep the tail
                del self._body[:-JSON_TAIL]

    def finish(self) -> None:
        if self._body:
            body = bytes(self._body)
            usage = _trailing_usage(body, whole_body=not self._tail_only)
            if not isinstance(usage, dict) and not self._tail_only:
                usage = _usage_of(body)  # another shape of body: the full parse
            if usage is not None:
                self.usage = usage
        if self.usage is not None:
            self.usage = _in_chat_terms(self.usage)

    def _scan_lines(self, lines: bytes) -> None:
        """Whole lines, one at a time: chunks that may hold usage or `[DONE]`, or end mid-line."""
        for line in lines.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            self.events += 1
            if carries_usage(data):  # parse only the few events that can carry usage
                usage = _usage_of(data)
                if usage is not None:
                    # Anthropic splits it: input tokens in `message_start`, output in `message_delta`.
                    self.usage = usage if self.usage is None else {**self.usage, **usage}


def carries_usage(data: bytes, end: int | None = None) -> bool:
    """Whether `data[:end]` may hold a usage object. Asked for usage, OpenAI also sends
    `"usage": null` in every other event: those need no parsing."""
    keys = data.count(USAGE_KEY, 0, end)
    return keys > 0 and keys > data.count(b'"usage":null', 0, end) + data.count(b'"usage": null', 0, end)


def without_usage_events(
    chunk: bytes, *, starts_an_event: bool,
) -> tuple[bytes, dict[str, Any] | None, bytes | None]:
    """`chunk` without its usage-only events (`"choices": []` plus `usage`), for a stream whose
    client did not ask for them: proxykit asked the upstream for usage itself, to count tokens.
    Also the usage of the last event removed, and that event's bytes, if any.

    Only whole events inside one chunk are removed, and nothing is ever held back: an event split
    across reads passes through untouched (the SDKs accept it; it is what `include_usage` sends).
    `starts_an_event`: the chunk before ended an event."""
    parts = chunk.split(b"\n\n")
    kept = []
    removed, removed_event = None, None
    for i, part in enumerate(parts):
        whole = (i > 0 or starts_an_event) and i < len(parts) - 1
        usage = _usage_only(part) if whole else None
        if usage is None:
            kept.append(part)
        else:
            removed, removed_event = usage, part
    return b"\n\n".join(kept), removed, removed_event


def _usage_only(event: bytes) -> dict[str, Any] | None:
    """The usage of a usage-only event, else None."""
    if not event.startswith(b"data:") or USAGE_KEY not in event:
        return None
    try:
        payload = json.loads(event[5:])
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or payload.get("choices") != []:
        return None
    usage = payload.get("usage")
    return usage if isinstance(usage, dict) else None


_DECODER: Final = json.JSONDecoder()


def _trailing_usage(body: bytes, *, whole_body: bool = True) -> Any:
    """`usage` when it is the last member of the top-level object, as OpenAI and vLLM send it,
    decoded without the rest of the body; None when the body has another shape. `body` may be
    only the tail of a large body (`whole_body` False).

    The last `"usage"` followed by `:` is a key (inside a JSON string a quote is escaped), and
    exactly one `}` after its value makes it a member of the object that ends the body."""
    at = body.rfind(USAGE_KEY)
    if at == -1 or (whole_body and not body.lstrip().startswith(b"{")):
        return None
    try:
        after_key = body[at + len(USAGE_KEY):].decode().lstrip()
        if not after_key.startswith(":"):
            return None
        value = after_key[1:].lstrip()
        usage, end = _DECODER.raw_decode(value)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return usage if value[end:].strip() == "}" else None


def _usage_of(data: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if usage is None and isinstance(response := payload.get("response"), dict):
        usage = response.get("usage")  # the Responses API's last event holds the whole response
    if usage is None and isinstance(message := payload.get("message"), dict):
        usage = message.get("usage")  # Anthropic's `message_start` holds the message
    return usage if isinstance(usage, dict) else None


def _in_chat_terms(usage: dict[str, Any]) -> dict[str, Any]:
    """`usage` with Chat Completions names: the Responses API (and Anthropic's) count the same
    tokens as `input_tokens` and `output_tokens`."""
    if "prompt_tokens" in usage or "input_tokens" not in usage:
        return usage
    named = {**usage, "prompt_tokens": usage["input_tokens"], "completion_tokens": usage.get("output_tokens")}
    if isinstance(details := usage.get("output_tokens_details"), dict):
        named["completion_tokens_details"] = details
    return named


def _decompressor(encoding: str | None) -> Any:
    if encoding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None
