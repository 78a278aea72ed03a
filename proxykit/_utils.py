"""Generic helpers with no proxykit knowledge."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

from starlette.types import Scope


def route_path(scope: Scope) -> str:
    """The path below the mount point: Starlette's Mount keeps `path` whole and extends `root_path`."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path):] or "/"
    return path


def leaves_its_base(path: str) -> bool:
    """Whether `path` holds a dot segment (`.` or `..`), also once more percent-decoded and with
    backslashes read as slashes, as some upstream servers read them. The ASGI `path` is decoded
    already, so `%2e%2e` and `..%2f` arrive here as `..`."""
    if "." not in path and "%" not in path:
        return False
    for candidate in (path, unquote(path)):
        for segment in candidate.replace("\\", "/").split("/"):
            if segment in (".", ".."):
                return True
    return False


def join_url(base_url: str, path: str, query: str = "") -> str:
    """`base_url` + `path`, with the base's own query (a Gemini-style `?key=`) kept after the path
    and the client's query after that."""
    if "?" in base_url:
        base_url, base_query = base_url.split("?", 1)
        query = f"{base_query}&{query}" if query else base_query
    return f"{base_url}{path}?{query}" if query else base_url + path


def printable_url(url: str) -> str:
    """`url` as it may be printed: no user or password, and no query value (it may be a key)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{pair.split('=', 1)[0]}=***" if "=" in pair else pair for pair in parts.query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query if parts.query else "", ""))
