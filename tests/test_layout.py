"""The shape of the code: no import cycle between the project's modules, no module over 450 lines.

Every import counts, at module level or inside a function: a lazy import that reaches back to a module
importing this one is the same knot (the CLI once had ``main -> commands -> *_commands -> main`` that way),
only deferred. Imports under ``if TYPE_CHECKING:`` never run and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("influence_store", "plugins")
MAX_LINES = 450

KNOWN_CYCLES: list[set[str]] = []  # none: never add one


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(nodes):
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _imports(node.orelse)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            yield from _imports(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from .pkg import name`` counts as ``pkg.name`` when that is a
    module, else as ``pkg``)."""
    known = modules()
    graph = {}
    for name, (path, is_package) in known.items():
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets.update(f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Groups of modules that reach each other through imports (strongly connected, Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_imports_that_make_cycles():
    """The checker itself: it finds a cycle formed by a function-level import, and none in a chain."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()
    assert "influence_store.cli.commands" in graph["influence_store.cli.main"]  # from .commands import ...
    assert "influence_store.errors" in graph["plugins.exact"]  # from influence_store.errors import ...
    assert "influence_store.curation" in graph["influence_store.cli.version_commands"]  # inside a function
    assert "influence_store.store" not in graph["influence_store.report"]  # only under TYPE_CHECKING


def test_no_import_cycle_between_the_projects_modules():
    found = cycles(import_graph())
    new = [sorted(group) for group in found if group not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"


def test_no_module_over_450_lines():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path, _ in modules().values()}
    offenders = {path: lines for path, lines in sorted(sizes.items()) if lines > MAX_LINES}
    assert not offenders, f"modules over {MAX_LINES} lines (split them by what they do): {offenders}"
