"""A cached answer, the key that finds it, and what a request's `Cache-Control` asks.

    key = cache_key(client="team-a", path="/chat/completions", payload=payload)
    entry = await backend.get(key)
    if entry is not None and entry.fresh(policy.max_age, ttl): ...
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

# Routes whose POST answers are cached: the same request always means the same answer.
CACHEABLE_PATHS: Final = frozenset({"/chat/completions", "/completions", "/embeddings"})
_ENTRY_OVERHEAD: Final = 512  # bytes an entry costs beyond its body: the objects that hold it
_CHUNK_OVERHEAD: Final = 40  # and each of its chunks


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One answer as the client got it live: its status, content type and body, chunk by chunk
    for a stream. A stream proxykit asked usage of holds its usage event too (`canonical`)."""

    status: int
    content_type: bytes
    chunks: tuple[bytes, ...]
    stream: bool
    tokens: int  # prompt + completion: what a hit saves
    stored_at: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        """Bytes counted against `max_bytes`: the body and headers, and what holds them."""
        body = sum(map(len, self.chunks))
        return body + len(self.content_type) + _ENTRY_OVERHEAD + _CHUNK_OVERHEAD * len(self.chunks)

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.stored_at)

    def fresh(self, ttl: float, max_age: float | None) -> bool:
        age = self.age()
        return age <= ttl and (max_age is None or age <= max_age)

    def to_bytes(self) -> bytes:
        return json.dumps({
            "status": self.status, "content_type": self.content_type.decode("latin-1"),
            "chunks": [base64.b64encode(chunk).decode() for chunk in self.chunks],
            "stream": self.stream, "tokens": self.tokens, "stored_at": self.stored_at,
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CacheEntry | None:
        """None for anything that is not an entry this version wrote."""
        try:
            raw = json.loads(data)
            return cls(
                status=int(raw["status"]), content_type=str(raw["content_type"]).encode("latin-1"),
                chunks=tuple(base64.b64decode(chunk) for chunk in raw["chunks"]), stream=bool(raw["stream"]),
                tokens=int(raw["tokens"]), stored_at=float(raw["stored_at"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


class CacheBackend(Protocol):
    """Where entries live. A backend that fails answers `get` with None and drops a `set`: a
    cache never fails a request."""

    async def get(self, key: str) -> CacheEntry | None: ...

    async def set(self, key: str, entry: CacheEntry, ttl: float) -> None: ...

    async def aclose(self) -> None: ...


def cache_key(*, client: str | None, path: str, payload: dict[str, Any]) -> str:
    """SHA-256 of the client (None when entries are shared), the path without `/v1`, the
    requested model and the body as canonical JSON; `stream` is in the body, `stream_options`
    is not (the stored stream holds its usage event, replayed only to a client that asks)."""
    body = {name: value for name, value in payload.items() if name != "stream_options"}
    text = json.dumps([client, path, payload.get("model"), body], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str)
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
            return cls()
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
