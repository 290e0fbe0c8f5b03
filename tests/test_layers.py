"""The house's arrows point one way (docs/concepts/architecture.md): each top-level package imports
only the packages below it, lazily or not, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What each package may import, besides itself: the layers below it.
BELOW = {
    "deltas": set(),
    "loaders": {"deltas"},
    "server": {"loaders", "deltas"},
    "training": {"server", "loaders", "deltas"},
    "cli": {"training", "server", "loaders", "deltas"},
    "bench": {"training", "server", "loaders", "deltas"},
    "examples": {"server"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in BELOW:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The project modules `path` imports: at module level, and anywhere (inside functions too)."""
    tree = ast.parse(path.read_text())
    top, anywhere = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                anywhere.add(name)
                if node in tree.body:
                    top.add(name)
    return top, anywhere


def test_each_package_imports_only_the_layers_below_it():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        package = name.split(".")[0]
        for target in _imports(path, modules)[1]:
            if target.split(".")[0] not in BELOW[package] | {package}:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_module_imports_itself_back():
    modules = _modules()
    graph = {name: _imports(path, modules)[0] - {name} for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, cycles
