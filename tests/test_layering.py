"""The direction of every import (docs/architecture.md, "Who may import whom").

The imports are read from the source with ``ast`` (nothing is imported), so
a forbidden import fails here even if no test runs the code. Imports under
``if TYPE_CHECKING:`` are left out: they never run. A layer's rule holds for
everything it reaches through the project's own modules, so a forbidden
library cannot come in through a helper module either.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("frames", "devices", "gateway", "simulators")
# The composition root: the one place allowed to import every layer.
COMPOSITION_ROOT = ("gateway.app", "gateway.cli", "gateway.demo", "gateway.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(body: Iterable[ast.stmt]) -> Iterator[ast.AST]:
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _runtime_nodes(node.orelse)
            continue
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _runtime_nodes([child])


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, node.module] if node.module else package)
    # "from pkg import name" may import the submodule pkg.name.
    out = [base]
    for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
            out.append(f"{base}.{alias.name}")
    return out


def imports_of(module: str) -> set[str]:
    """Every module ``module`` imports when it runs (project modules and libraries)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: set[str] = set()
    for node in _runtime_nodes(tree.body):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.update(_resolve(module, path, node))
    return out


def _project(name: str) -> str | None:
    """The project module an import names (a package's ``__init__`` runs first), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def direct_graph() -> dict[str, set[str]]:
    """Project module -> the project modules its import statements name."""
    out: dict[str, set[str]] = {}
    for module in MODULES:
        targets = {_project(name) for name in imports_of(module)}
        out[module] = {t for t in targets if t is not None and t != module}
    return out


DIRECT = direct_graph()


def _parents(module: str) -> Iterator[str]:
    while "." in module:
        module = module.rpartition(".")[0]
        if module in MODULES:
            yield module


def reach(module: str) -> set[str]:
    """The project modules that run when ``module`` is imported, itself included.

    Importing ``a.b.c`` runs ``a`` and ``a.b`` first, so parents count too.
    """
    seen = {module, *_parents(module)}
    todo = list(seen)
    while todo:
        for nxt in DIRECT[todo.pop()]:
            for m in (nxt, *_parents(nxt)):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
    return seen


def libraries(modules: Iterable[str]) -> set[str]:
    """Top-level names of the libraries these modules import."""
    return {
        name.split(".")[0]
        for m in modules
        for name in imports_of(m)
        if _project(name) is None and name
    }


def _in(module: str, *layers: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def layer_modules(*layers: str) -> list[str]:
    return [m for m in MODULES if _in(m, *layers)]


# ---- the rules --------------------------------------------------------------------------------

# layer -> the project layers its modules may reach
ALLOWED: dict[str, tuple[str, ...]] = {
    "frames": ("frames",),
    "devices": ("devices", "frames"),
    "simulators": ("simulators", "frames"),
    "gateway.hub": ("gateway.hub", "gateway.metrics", "gateway", "devices", "frames"),
    # The cluster engine (docs/cluster.md) fills the hub's seam: no web, no SQLite of its own.
    "gateway.cluster": (
        "gateway.cluster",
        "gateway.hub",
        "gateway.metrics",
        "gateway",
        "devices",
        "frames",
    ),
}

# layer -> libraries nothing it reaches may import
FORBIDDEN_LIBRARIES: dict[str, tuple[str, ...]] = {
    "frames": ("asyncio", "aiohttp", "sqlite3", "serial", "serial_asyncio"),
    "devices": ("aiohttp", "sqlite3"),
    "simulators": ("aiohttp", "sqlite3"),
    "gateway.hub": ("aiohttp", "sqlite3"),
    "gateway.cluster": ("aiohttp", "sqlite3"),
    "gateway.storage": ("aiohttp",),
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_reaches_only_what_it_may(layer: str) -> None:
    allowed = ALLOWED[layer]
    bad: list[str] = []
    for module in layer_modules(layer):
        for target in sorted(reach(module)):
            # "gateway" alone (the package __init__) is allowed where listed; its
            # submodules only when listed themselves.
            ok = any(target == a if a == "gateway" else _in(target, a) for a in allowed)
            if not ok:
                bad.append(f"{module} -> {target}")
    assert not bad, f"{layer} may reach only {allowed}:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_LIBRARIES))
def test_layer_never_loads_a_forbidden_library(layer: str) -> None:
    bad: list[str] = []
    for module in layer_modules(layer):
        found = libraries(reach(module)) & set(FORBIDDEN_LIBRARIES[layer])
        if found:
            bad.append(f"{module}: {sorted(found)}")
    assert not bad, "\n".join(bad)


def test_only_the_composition_root_imports_it() -> None:
    bad = [
        f"{module} -> {target}"
        for module in MODULES
        if not _in(module, *COMPOSITION_ROOT)
        for target in DIRECT[module]
        if _in(target, *COMPOSITION_ROOT)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    # Tarjan's strongly connected components over the import statements.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(DIRECT[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(DIRECT):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walker_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The checks above are only as good as the import reader: it must see a
    # relative import, a submodule import and skip TYPE_CHECKING blocks.
    source = (
        "from typing import TYPE_CHECKING\n"
        "import aiohttp\n"
        "from ..storage import sqlite\n"
        "if TYPE_CHECKING:\n"
        "    import sqlite3\n"
    )
    tree = ast.parse(source)
    names = {
        alias.name
        for node in _runtime_nodes(tree.body)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert names == {"aiohttp"}
