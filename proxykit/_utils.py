"""Generic helpers with no proxykit knowledge."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import Scope


@contextmanager
def collapse_excgroups() -> Iterator[None]:
    """Re-raise the lone exception of a group: anyio 4 wraps even one error in an ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None


def route_path(scope: Scope) -> str:
    """The path below the mount point: Starlette's Mount keeps `path` whole and extends `root_path`."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path):] or "/"
    return path
