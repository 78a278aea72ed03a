"""A cached answer, the key that finds it, and what a request's `Cache-Control` asks.

    key = cache_key(client="team-a", path="/chat/completions", payload=payload)
    entry = await backend.get(key)
    if entry is not None and entry.fresh(policy.max_age, ttl): ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

# Routes whose POST answers are cached: the same request always means the same answer.
CACHEABLE_PATHS: Final = frozenset({"/chat/completions", "/completions", "/embeddings"})
_MAGIC: Final = b"PK2"  # entries of another layout are misses, never misread
# magic, status, stream, prompt tokens, completion tokens, stored at, content type length, chunks
_HEADER: Final = struct.Struct("!3sHBQQdHI")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One answer as the client got it live: its status, content type and body, chunk by chunk
    for a stream. A stream proxykit asked usage of holds its usage event too (`canonical`)."""

    status: int
    content_type: bytes
    chunks: tuple[bytes, ...]
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    stored_at: float = field(default_factory=time.time)

    @property
    def tokens(self) -> int:
        """Prompt + completion: what a hit saves."""
        return self.prompt_tokens + self.completion_tokens

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.stored_at)

    def fresh(self, ttl: float, max_age: float | None) -> bool:
        age = self.age()
        return age <= ttl and (max_age is None or age <= max_age)

    def pack(self) -> bytes:
        return pack_entry(self.status, self.content_type, self.chunks, self.stream, self.prompt_tokens,
                          self.completion_tokens, self.stored_at)

    @classmethod
    def unpack(cls, data: bytes) -> CacheEntry | None:
        """None for anything that is not an entry this version packed."""
        try:
            magic, status, stream, prompt, completion, stored_at, type_length, count = _HEADER.unpack_from(data)
            if magic != _MAGIC:
                return None
            at = _HEADER.size + type_length
            lengths = struct.unpack_from(f"!{count}I", data, at)
            at += 4 * count
            chunks = []
            for length in lengths:
                chunks.append(data[at:at + length])
                at += length
            if at != len(data):
                return None
        except struct.error:
            return None
        content_type = data[_HEADER.size:_HEADER.size + type_length]
        return cls(status, content_type, tuple(chunks), bool(stream), prompt, completion, stored_at)


def pack_entry(
    status: int, content_type: bytes, chunks: Sequence[bytes], stream: bool, prompt_tokens: int,
    completion_tokens: int, stored_at: float,
) -> bytes:
    """An entry as one bytes object: the form both backends keep, made straight from an answer
    as it is stored (a `CacheEntry` is made only to replay one). In memory it matters that it is
    one object: the garbage collector has nothing to walk in a cache of thousands of entries."""
    header = _HEADER.pack(_MAGIC, status, stream, prompt_tokens, completion_tokens, stored_at, len(content_type),
                          len(chunks))
    lengths = struct.pack(f"!{len(chunks)}I", *map(len, chunks))
    return b"".join((header, content_type, lengths, *chunks))


class CacheBackend(Protocol):
    """Where entries live, packed (`pack_entry`). A backend that fails answers `get` with None
    and drops a `set`: a cache never fails a request."""

    async def get(self, key: str) -> CacheEntry | None: ...

    async def set(self, key: str, packed: bytes, ttl: float) -> None: ...

    async def aclose(self) -> None: ...


# Made once: `json.dumps` with options builds an encoder per call. A parsed body holds no cycles to check for.
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str,
                                     check_circular=False)


def cache_key(*, client: str | None, path: str, payload: dict[str, Any]) -> str:
    """SHA-256 of the client (None when entries are shared), the path without `/v1`, the
    requested model and the body as canonical JSON; `stream` is in the body, `stream_options`
    is not (the stored stream holds its usage event, replayed only to a client that asks)."""
    body = payload if "stream_options" not in payload else {
        name: value for name, value in payload.items() if name != "stream_options"}
    text = _CANONICAL.encode([client, path, payload.get("model"), body])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """A request's `Cache-Control`: `no-store` neither looks nor stores, `no-cache` stores without
    looking, `max-age=N` takes only entries at most N seconds old."""

    look: bool = True
    store: bool = True
    max_age: float | None = None

    @classmethod
    def of(cls, header: bytes | None) -> CachePolicy:
        if not header:
            return _NO_DIRECTIVES
        look, store, max_age = True, True, None
        for directive in header.decode("latin-1").lower().split(","):
            name, _, value = directive.strip().partition("=")
            if name == "no-store":
                look = store = False
            elif name == "no-cache":
                look = False
            elif name == "max-age":
                with contextlib.suppress(ValueError):
                    max_age = max(0.0, float(value.strip().strip('"')))
        return cls(look, store, max_age)


_NO_DIRECTIVES: Final = CachePolicy()  # most requests: made once, not per request
