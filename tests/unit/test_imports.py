"""fedmq's import graph, read with ``ast`` from the installed package: no cycles, pika in one place.

Every module of the installed ``fedmq`` package counts (``fedmq/*.py`` and the folders that
install as ``fedmq.shared``, ``fedmq.broker``, ``fedmq.worker`` and ``fedmq.aggregator``), and
so does every import in it, at module level or inside a function; only imports under
``if TYPE_CHECKING:`` are left out, as they never run.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGES = ("fedmq", "fedmq.shared", "fedmq.broker", "fedmq.worker", "fedmq.aggregator")
REPO = Path(__file__).resolve().parents[2]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed as a package"
    return Path(next(iter(spec.submodule_search_locations)))


def fedmq_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the installed fedmq package."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        root = package_dir(package)
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if any(not p.isidentifier() for p in parts):
                continue
            name = ".".join([package, *parts])
            if package == "fedmq" and name.split(".")[1:2] and f"fedmq.{parts[0]}" in PACKAGES:
                continue  # a mapped subpackage: read from its own folder
            modules[name] = path
    return modules


class _Imports(ast.NodeVisitor):
    """(module imported, line) for every import that runs, at any depth."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, list[str], int]] = []  # (module, names from it, line)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        self.found.append((target, [a.name for a in node.names], node.lineno))


def imports_of(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    visitor = _Imports(name, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


def resolve(target: str, names: list[str], modules: dict[str, Path]) -> set[str]:
    """The fedmq modules an import statement loads (``from pkg import mod`` loads pkg.mod)."""
    out: set[str] = set()
    for name in names or [""]:
        full = f"{target}.{name}" if name else target
        candidate = full if full in modules else target
        while candidate and candidate not in modules:
            candidate = candidate.rpartition(".")[0]
        if candidate:
            out.add(candidate)
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    modules = fedmq_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lines: dict[tuple[str, str], int] = {}
    for name, path in modules.items():
        for target, names, line in imports_of(name, path):
            if not target.startswith("fedmq"):
                continue
            for dep in resolve(target, names, modules):
                if dep != name:
                    graph[name].add(dep)
                    lines.setdefault((name, dep), line)
    return graph, lines


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_a_cycle(sorted(c)[0], set(c), graph) for c in components]


def _a_cycle(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return [start]


def test_the_graph_sees_every_package_and_both_kinds_of_import() -> None:
    graph, _ = import_graph()
    assert {"fedmq.cli", "fedmq.runner", "fedmq.shared.events", "fedmq.broker.client", "fedmq.worker.service",
            "fedmq.aggregator.service"} <= set(graph)
    assert "fedmq.runner" in graph["fedmq.cli"]  # a function-level import counts


def test_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_fedmq_modules() -> None:
    graph, lines = import_graph()
    found = cycles(graph)
    described = [
        " -> ".join(cycle) + "  (" + ", ".join(f"{a}:{lines[(a, b)]}" for a, b in zip(cycle, cycle[1:], strict=False)) + ")"
        for cycle in found
    ]
    assert not found, "import cycles (module:line of each import):\n" + "\n".join(described)


def test_only_the_broker_package_imports_pika() -> None:
    offenders = [
        f"{name}:{line}"
        for name, path in fedmq_modules().items()
        if not name.startswith("fedmq.broker")
        for target, _names, line in imports_of(name, path)
        if target == "pika" or target.startswith("pika.")
    ]
    assert not offenders, f"pika imported outside fedmq.broker: {offenders}"


def test_the_aggregator_core_is_free_of_io_and_clocks() -> None:
    core = package_dir("fedmq.aggregator") / "core.py"
    if not core.exists():
        pytest.skip("fedmq/aggregator/core.py does not exist yet")
    banned = {"pika", "threading", "time"}
    found = [f"{target}:{line}" for target, _names, line in imports_of("fedmq.aggregator.core", core)
             if target.split(".")[0] in banned]
    assert not found, f"fedmq.aggregator.core imports {found}"


def _scripts() -> Iterator[Path]:
    for folder in ("bench", "scripts"):
        yield from sorted((REPO / folder).glob("*.py"))


def test_bench_and_scripts_import_nothing_from_tests() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for path in _scripts()
        for target, _names, line in imports_of(f"{path.parent.name}.{path.stem}", path)
        if target == "tests" or target.startswith("tests.")
    ]
    assert not found, f"bench/ and scripts/ must not import tests/: {found}"
