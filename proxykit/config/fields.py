"""Typed reads of plain YAML values for the config reader, collecting problems with field paths."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from proxykit.upstream.proxy import DIRECT, parse_proxy

_ENV_VAR: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

T = TypeVar("T")


class FieldReader:
    """Typed reads of single fields, each problem recorded with its field path instead of
    stopping at the first. `${VAR}` in strings and numbers is replaced from `environ`."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, "must be a mapping")
            return {}
        for key in value:
            if key not in allowed:  # a typo must not silently fall back to a default
                expected = ", ".join(sorted(allowed))
                self.fail(f"{path}.{key}" if path else str(key), f"unknown field (expected one of: {expected})")
        return value

    def expand(self, value: str, path: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.environ:
                self.fail(path, f"environment variable {name} is not set")
                return ""
            return self.environ[name]

        return _ENV_VAR.sub(substitute, value)

    def string(self, value: Any, path: str, *, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.fail(path, "is required")
            return None
        if not isinstance(value, str) or (required and not value.strip()):
            self.fail(path, "must be a non-empty string")
            return None
        return self.expand(value, path)

    def number(self, value: Any, path: str, kind: Callable[[Any], T], *, minimum: float = 0) -> T | None:
        if isinstance(value, str):
            value = self.expand(value, path)
            try:
                value = float(value) if kind is float else int(value)
            except ValueError:
                self.fail(path, f"must be a number, got {value!r}")
                return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(path, "must be a number")
            return None
        if kind is int and value != int(value):
            self.fail(path, "must be a whole number")
            return None
        if value < minimum:
            self.fail(path, f"must be at least {minimum:g}")
            return None
        return kind(value)

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, "must be true or false")
            return default
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...], default: str) -> str:
        if value is None:
            return default
        if value not in choices:
            self.fail(path, f"must be one of: {', '.join(choices)}")
            return default
        return str(value)

    def section(self, data: dict[str, Any], name: str, cls: type[T], numbers: dict[str, Callable[[Any], Any]]) -> T:
        """A flat section of numbers whose defaults live on `cls`."""
        raw = self.mapping(data.get(name), name, tuple(numbers))
        values = {}
        for key, kind in numbers.items():
            if raw.get(key) is not None:
                parsed = self.number(raw[key], f"{name}.{key}", kind)
                if parsed is not None:
                    values[key] = parsed
        return cls(**values)

    def static_headers(self, raw: Any, path: str) -> tuple[tuple[str, str], ...]:
        """A deployment's extra headers: names and values a request line can carry."""
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            self.fail(path, "must be a mapping of header names to values")
            return ()
        headers = []
        for name, value in raw.items():
            text = self.expand(str(value), f"{path}.{name}") if isinstance(value, (str, int, float)) else None
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                self.fail(path, f"{name!r} is not a header name")
            elif name.lower() in _RESERVED_HEADERS:
                self.fail(f"{path}.{name}", "is set by proxykit itself")
            elif text is None or not fits_a_header(text):
                self.fail(f"{path}.{name}", "must be a string of printable ASCII")
            else:
                headers.append((name.lower(), text))
        return tuple(headers)

    def proxy(self, raw: Any, path: str) -> str | None:
        """A deployment's egress proxy: an http:// URL, or `none` for a direct connection."""
        value = self.string(raw, path)
        if value is None:
            return None
        value = value.strip()
        if value.lower() == DIRECT:
            return DIRECT
        try:
            parse_proxy(value)
        except ValueError as exc:
            self.fail(path, str(exc))
        return value


# Headers a deployment's `headers` may not set: the key's, the body's framing, the request's own.
_RESERVED_HEADERS = frozenset({
    "authorization", "x-api-key", "api-key", "host", "content-length", "transfer-encoding", "connection",
    "x-request-id",
})


def fits_a_header(secret: str) -> bool:
    return secret.isascii() and secret.isprintable()
