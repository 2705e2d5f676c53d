"""The import graph of factedit leans one way: no module imports one above it, no cycles.

Every module under src/factedit is parsed with `ast`, and every import in it counts, those
inside functions included (a lazy import hides a dependency, it does not remove it); only
imports under `if TYPE_CHECKING:` are left out, since they never run. Each top-level part of
the package has a layer, lowest first:

    0  _version, text, requests   conventions and plain data: import nothing of factedit
    1  models                     loading, architecture facts, hooks, scoring rows
    2  linalg, metrics, data      algebra on a model; scores of a model; datasets
    3  methods                    editors (a config and an Editor each), the registry
    4  protocol, preflight, patch applying edits (handle, modes, saved state); checks a
                                  command runs before loading a model; patch files
    5  factedit                   the package's own __init__: the public face (fe.edit,
                                  fe.load_model, ...) that the command line builds on
    6  lab                        experiments, runs, the results store
    7  report                     pages and plots of lab runs
    8  serve                      the editing service built on the protocol and patches
    9  commands, cli, __main__    the command line

A module may import its own layer or any below. A new top-level package must be given a
layer here before the test passes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "factedit"
LAYERS: dict[str, int] = {
    "_version": 0, "text": 0, "requests": 0,
    "models": 1,
    "linalg": 2, "metrics": 2, "data": 2,
    "methods": 3,
    "protocol": 4, "preflight": 4, "patch": 4,
    PACKAGE: 5,
    "lab": 6,
    "report": 7,
    "serve": 8,
    "commands": 9, "cli": 9, "__main__": 9,
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under src/factedit."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    found = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the factedit modules it imports (a `from X import name` of a submodule
    counts as importing the submodule)."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
                continue
            if node.level:
                base = here[:len(here) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                targets.add(child if child in modules else source)
        edges[name] = {t for t in targets if t != name}
    return edges


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_edges(module_files())


def test_every_top_level_part_has_a_layer(graph):
    unplaced = sorted({layer_of(m) for m in graph} - set(LAYERS))
    assert not unplaced, (f"give {unplaced} a layer in LAYERS (and the docstring) of "
                          f"{Path(__file__).name}")


def test_no_module_imports_one_above_it(graph):
    upward = [f"{source} (layer {LAYERS[layer_of(source)]}) imports {target} "
              f"(layer {LAYERS[layer_of(target)]})"
              for source, targets in sorted(graph.items()) for target in sorted(targets)
              if LAYERS.get(layer_of(target), -1) > LAYERS.get(layer_of(source), 99)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles(graph):
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_check_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    """The parser counts an import inside a function and ignores one under TYPE_CHECKING."""
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from factedit.cli import main\n"
                     "def f():\n    from factedit.protocol import edit\n")
    names = [n.module for n in _imports(tree) if isinstance(n, ast.ImportFrom)]
    assert "factedit.protocol" in names and "factedit.cli" not in names
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
