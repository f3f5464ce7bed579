"""The package's import graph has no cycles, and the registry imports no model (as in timm)."""

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "compresslight"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (function-local imports too:
    a deferred import is still a dependency). `from package import name` counts as an edge to the
    package's `__init__` and, when `name` is a submodule, to it."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for target in graph[node]:
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "compresslight.cli" in graph and graph["compresslight.cli"]  # the walk sees the package
    cycles = [cycle for name in graph if (cycle := cycle_through(graph, name))]
    assert cycles == [], " ; ".join(" -> ".join(cycle) for cycle in cycles)


def test_registry_imports_no_model_and_the_cli_class_not_the_commands():
    graph = import_graph()
    assert not any(target.startswith("compresslight.models") for target in graph["compresslight.registry"])
    assert "compresslight.commands" not in graph["compresslight.lightning_cli"]
    assert not any(target.startswith("compresslight.sweep") for target in graph["compresslight.commands"])
