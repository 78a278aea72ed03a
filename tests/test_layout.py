"""The package's shape, held by a test: the core subpackages know nothing of ASGI, nothing imports
in a circle, and no module outgrows a reader."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "proxykit"
# Subsystems that must work without a web framework: a store, a CLI or a test can use them alone.
CORE = ("config", "upstream", "keys", "limits", "usage", "cache", "store", "errors", "outcomes", "durations")
ASGI_SIDE = ("starlette", "proxykit.context", "proxykit.middleware", "proxykit.respond", "proxykit.body",
             "proxykit.forward", "proxykit.app", "proxykit.api", "proxykit.resources", "proxykit.paths",
             "proxykit.headers", "proxykit.sends", "proxykit.watch")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, runtime_only: bool) -> set[str]:
    """Modules `path` imports; `runtime_only` leaves out those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(child) for child in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def reached_from(name: str) -> set[str]:
    """Every proxykit module `name` imports at run time, directly or through another."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        for target in imports(MODULES[current], runtime_only=True):
            if target in MODULES and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[1:2] and n.split(".")[1] in CORE), ids=str)
def test_core_modules_import_nothing_of_asgi(name: str) -> None:
    direct = imports(MODULES[name], runtime_only=False)  # TYPE_CHECKING imports count too
    through = set().union(*(imports(MODULES[other], runtime_only=True) for other in reached_from(name)))
    forbidden = {
        imported for imported in direct | through | reached_from(name)
        if any(imported == side or imported.startswith(side + ".") for side in ASGI_SIDE)
    }
    assert not forbidden, f"{name} imports, directly or not, {forbidden}"


def test_no_import_cycle() -> None:
    graph = {
        name: {target for target in imports(path, runtime_only=True) if target in MODULES and target != name}
        for name, path in MODULES.items()
    }
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(name):], name])
        visiting.append(name)
        for target in sorted(graph[name]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("name", sorted(MODULES), ids=str)
def test_modules_stay_readable(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES
