"""Upstream keys taken out of what an upstream says back: some providers echo the key they got
("Incorrect API key provided: sk-..."), and that text must not reach the client.

    redactor = Redactor({b"sk-secret": b"pool#0"})
    for chunk in body:
        send(redactor.feed(chunk))
    send(redactor.finish())
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

MIN_SECRET: Final = 8  # shorter "keys" (a test's "x") would turn ordinary words into aliases


class Redactor:
    """Replaces each secret with its alias in a body that passes in pieces. It holds back only
    the last `len(longest secret) - 1` bytes, which could be the start of a secret split across
    two pieces."""

    def __init__(self, replacements: Mapping[bytes, bytes]) -> None:
        self._replacements = {secret: alias for secret, alias in replacements.items() if len(secret) >= MIN_SECRET}
        self._hold = max(map(len, self._replacements), default=1) - 1
        self._pending = b""

    @property
    def active(self) -> bool:
        return bool(self._replacements)

    def feed(self, chunk: bytes) -> bytes:
        data = self._replace(self._pending + chunk)
        cut = max(0, len(data) - self._hold)
        self._pending = data[cut:]
        return data[:cut]

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _replace(self, data: bytes) -> bytes:
        for secret, alias in self._replacements.items():
            if secret in data:
                data = data.replace(secret, alias)
        return data
