"""The request path: below the mount point, and whether it would leave a deployment's base_url."""

from __future__ import annotations

from urllib.parse import unquote

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
