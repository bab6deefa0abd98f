"""The house rules, read from the source: who may import whom, no import circles, no huge module.

Every `import` statement counts, at module level, inside functions and under `TYPE_CHECKING`
alike: a lazy import hides a dependency from the interpreter, not from the design.

- `chaos_planner` imports no other part.
- `chaos_worker` imports only `chaos_planner`.
- `chaos_operator` imports `chaos_planner` and, of the worker, only its config contract
  (`chaos_worker.config`) and metrics exporter (`chaos_worker.telemetry.exporter`).
- `chaos_cli` may import all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PARTS = {
    "chaos_planner": REPO / "planner" / "chaos_planner",
    "chaos_worker": REPO / "worker" / "chaos_worker",
    "chaos_operator": REPO / "operator" / "chaos_operator",
    "chaos_cli": REPO / "cli" / "chaos_cli",
}
ALLOWED = {
    "chaos_planner": set(),
    "chaos_worker": {"chaos_planner"},
    "chaos_operator": {"chaos_planner", "chaos_worker.config", "chaos_worker.telemetry.exporter"},
    "chaos_cli": {"chaos_planner", "chaos_worker", "chaos_operator"},
}
MAX_MODULE_LINES = 600


def _modules() -> dict[str, Path]:
    """Every module of the four parts, by dotted name (a package by its own name)."""
    found = {}
    for top, root in PARTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The modules of the four parts that `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _allowed(importer: str, imported: str) -> bool:
    top = importer.split(".")[0]
    if imported.split(".")[0] == top:
        return True
    return any(imported == a or imported.startswith(a + ".") for a in ALLOWED[top])


def test_the_modules_are_found() -> None:
    for top in PARTS:
        assert sum(name.startswith(top) for name in MODULES) > 3, top
    assert "chaos_worker.member" in GRAPH
    assert "chaos_worker.config" in GRAPH["chaos_worker.process"]


def test_each_part_imports_only_what_the_dependency_rule_allows() -> None:
    broken = sorted(
        f"{importer} -> {imported}"
        for importer, imports in GRAPH.items()
        for imported in imports
        if not _allowed(importer, imported)
    )
    assert broken == []


def test_the_rule_catches_a_back_import() -> None:
    assert not _allowed("chaos_worker.member", "chaos_cli.local.launcher")
    assert not _allowed("chaos_operator.reconcile", "chaos_worker.member")
    assert _allowed("chaos_operator.metrics", "chaos_worker.telemetry.exporter")
    assert not _allowed("chaos_planner.solve", "chaos_worker.config")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_there_are_no_import_circles() -> None:
    # A package importing its own modules (an __init__ that re-exports) is no circle unless
    # one of those modules imports the package back; both edges count here.
    assert _cycles(GRAPH) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_600_lines() -> None:
    long = {
        name: lines
        for name, path in MODULES.items()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
