"""The package's modules import each other without a cycle, lower layers never importing higher."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptflax"

pytestmark = pytest.mark.lab4


def module_name(path: Path) -> str:
    """A module's name inside the package: "generate", "models.gpt", "weights" (an __init__)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that a module imports, by name ("gpt" of `from gptflax.models
    import gpt` is "models.gpt"; `from gptflax import models` is "models")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptflax"):
            base = node.module.removeprefix("gptflax").lstrip(".")
            for alias in node.names:
                child = f"{base}.{alias.name}".lstrip(".")
                found.add(child if child in known else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("gptflax.") for a in node.names
                      if a.name.startswith("gptflax.")}  # fmt: skip
    return found - {module_name(path), ""}


def package_graph() -> dict[str, set[str]]:
    paths = list(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) for p in paths}


# The layers of ../shared/DESIGN.md, lowest first: a module imports only from its own layer (with
# no cycle) or below. A package's modules sit in the package's layer.
LAYERS = [
    {"config"},
    {"nn", "files", "gguf", "chat", "bpe", "plots", "memory", "sizes", "answers", "corpora"},
    {"attention", "rope", "decoding", "tokenizer", "data", "nnx_model", "benchmarks"},
    {"models"},
    {"generate", "losses", "checkpoint", "parallel", "lora", "weights", "streaming"},
    {"training", "finetune", "instruct", "dpo", "sources", "batching", "evaluate", "speed"}
    | {"tokenfiles", "pipeline"},  # token files read the tokenizers' registry (sources)
    {"serve"},
    {"cli", "__main__", ""},
]


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


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


def test_the_package_has_no_import_cycle_and_no_layer_imports_a_higher_one():
    graph = package_graph()
    assert graph["cli.train"] >= {"training.run"}  # the walk sees real imports
    cli = set().union(*(deps for name, deps in graph.items() if name.startswith("cli")))
    assert not cli & {"training.loop", "training.fit", "training.step", "data"}
    assert "models.gpt" in graph["models"] and "weights.names" in graph["weights.gguf"]
    assert find_cycle(graph) is None, find_cycle(graph)
    upward = [(a, b) for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a)]
    assert not upward, upward
    assert graph["nnx_model"] <= {"config", "nn"}  # the twin is written independently
