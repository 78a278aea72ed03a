"""Generic helpers with no proxykit knowledge."""

from __future__ import annotations

from starlette.types import Scope


def route_path(scope: Scope) -> str:
    """The path below the mount point: Starlette's Mount keeps `path` whole and extends `root_path`."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path):] or "/"
    return path
