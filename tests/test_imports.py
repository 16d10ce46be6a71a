"""The package's modules import each other without a cycle, lower layers never importing higher."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptflax"

pytestmark = pytest.mark.lab4


def imports_of(path: Path) -> set[str]:
    """The gptflax modules that a module imports (by module name, e.g. "gpt")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "gptflax":
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gptflax.")}
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(module, trail):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return trail[trail.index(dep) :] + [dep] if dep in trail else [module, dep]
            if dep not in state and (cycle := visit(dep, trail + [dep])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_cycle():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}
    assert graph["cli"] >= {"train", "generate"}  # the walk sees real imports
    assert find_cycle(graph) is None, find_cycle(graph)
    assert not any("cli" in deps for name, deps in graph.items() if name != "__main__")
