"""Usage read from plain JSON bodies: the fast read of a trailing `usage` must agree with a full parse."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from proxykit.usage.reader import UsageReader

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def read(body: bytes, *, chunk: int = 7) -> dict[str, Any] | None:
    reader = UsageReader(event_stream=False, encoding=None)
    for start in range(0, len(body), chunk):  # as the socket would deliver it, in pieces
        reader.feed(body[start:start + chunk])
    reader.finish()
    return reader.usage


def top_level_usage(body: bytes) -> Any:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage if isinstance(usage, dict) else None


@pytest.mark.parametrize("body", [
    json.dumps({"id": "x", "choices": [], "usage": USAGE}).encode(),  # OpenAI's shape: usage last
    json.dumps({"id": "x", "usage": USAGE, "choices": []}).encode(),  # usage first
    json.dumps({"choices": [{"message": {"content": "é \"usage\": {}"}}], "usage": USAGE}, ensure_ascii=False).encode(),
    json.dumps({"usage": USAGE, "meta": {"usage": {"prompt_tokens": 99}}}).encode(),  # a nested one after it
    json.dumps({"meta": {"usage": {"prompt_tokens": 99}}}).encode(),  # only a nested one
    json.dumps({"choices": [], "usage": None}).encode(),
    json.dumps([{"usage": USAGE}]).encode(),  # not an object
    b'{"choices": [], "usage" :\n {"prompt_tokens": 3} }\n',  # spacing
    b'{"choices": [], "usage": {"prompt_tokens": 3}',  # cut short: not JSON
    b'{"usage": {"prompt_tokens": 3}} trailing',
])
def test_usage_of_a_plain_body_is_the_top_level_field(body: bytes) -> None:
    assert read(body) == top_level_usage(body)


def test_the_usual_body_yields_its_usage() -> None:
    # Guards the test above against agreeing on None everywhere.
    assert read(json.dumps({"choices": [], "usage": USAGE}).encode()) == USAGE


STREAM = b"".join([
    b'data: {"choices":[{"delta":{"content":"x data: y [DONE]"}}]}\n\n',
    b'data:{"choices":[{"delta":{"content":"z"}}]}\r\n\r\n',
    b": keep-alive comment\n\n",
    b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n',
    b"data: [DONE]\n\n",
])


NO_USAGE = STREAM.replace(b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n', b"")
# Asked for usage, OpenAI puts `"usage": null` in every other event.
NULL_USAGE = b"".join([
    b'data: {"choices":[{"delta":{"content":"x data: y [DONE]"}}],"usage":null}\n\n',
    b'data:{"choices":[{"delta":{"content":"z"}}], "usage": null}\r\n\r\n',
    b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n',
    b"data: [DONE]\n\n",
])
SPLITS = [
    *(pytest.param(STREAM, cut, 3, {"total_tokens": 3}, id=f"usage-{cut}") for cut in range(1, len(STREAM))),
    *(pytest.param(NO_USAGE, cut, 2, None, id=f"no-usage-{cut}") for cut in range(1, len(NO_USAGE))),
    *(pytest.param(NULL_USAGE, cut, 3, {"total_tokens": 3}, id=f"null-usage-{cut}")
      for cut in range(1, len(NULL_USAGE))),
]


@pytest.mark.parametrize(("stream", "cut", "events", "usage"), SPLITS)
def test_stream_events_and_usage_survive_any_split(
    stream: bytes, cut: int, events: int, usage: dict[str, int] | None
) -> None:
    reader = UsageReader(event_stream=True, encoding=None)
    reader.feed(stream[:cut])
    reader.feed(stream[cut:])
    reader.finish()
    assert (reader.events, reader.usage) == (events, usage)


def test_stream_read_a_byte_at_a_time() -> None:
    reader = UsageReader(event_stream=True, encoding=None)
    for i in range(len(STREAM)):
        reader.feed(STREAM[i:i + 1])
    assert (reader.events, reader.usage) == (3, {"total_tokens": 3})


def test_a_caller_that_found_no_usage_is_not_trusted_where_it_could_not_see_it() -> None:
    # The hint is about the bytes the caller searched: not the unfinished line before them, and
    # not what compressed bytes inflate to.
    split = UsageReader(event_stream=True, encoding=None)
    split.feed(b'data: {"choices":[],"us')
    split.feed(b'age":{"total_tokens":3}}\n\n', without_usage=True)
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    events = b'data: {"choices":[{"delta":{"content":"z"}}]}\n\ndata: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    compressed = compressor.compress(events) + compressor.flush()
    inflated = UsageReader(event_stream=True, encoding="gzip")
    inflated.feed(compressed, without_usage=True)
    for reader in (split, inflated):
        reader.finish()
    assert (split.events, split.usage) == (1, {"total_tokens": 3})
    assert (inflated.events, inflated.usage) == (2, {"total_tokens": 3})


def test_anthropic_usage_is_read_from_message_start_and_message_delta() -> None:
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 25, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
    ]
    body = b"".join(
        f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events
    )
    reader = UsageReader(event_stream=True, encoding=None)
    for start in range(0, len(body), 13):
        reader.feed(body[start:start + 13])
    reader.finish()
    assert reader.usage is not None
    assert (reader.usage["prompt_tokens"], reader.usage["completion_tokens"]) == (25, 15)


def test_anthropic_json_usage_is_read_in_chat_terms() -> None:
    body = json.dumps({"id": "msg_1", "content": [], "usage": {"input_tokens": 7, "output_tokens": 3}}).encode()
    usage = read(body)
    assert usage is not None
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (7, 3)
