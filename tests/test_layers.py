"""The package's architecture as a contract: imports point down the floors, never up,
and no two modules import each other (directly or round a loop).

Every import statement of every module counts, also those inside functions and under
``if TYPE_CHECKING:``: a deferred import is still a dependency. A lower floor that
needs a service of a higher one defines a small protocol on its own floor and is handed
the implementation. A new top-level module or package has to be placed on a floor in
:data:`FLOORS` before the test passes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "mtl_runner"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

#: Top-level modules and packages of mtl_runner/, from the top floor to the bottom one. A
#: module may import from its own floor (as long as no cycle forms) and from lower ones.
FLOORS: list[frozenset[str]] = [
    frozenset({"", "__main__", "cli"}),  # "": the package's own __init__
    frozenset({"advise", "runner", "report", "seeds", "affinity", "baselines"}),
    frozenset({"preflight", "assemble", "build", "sweep", "results"}),
    frozenset({"train", "diagnostics"}),
    frozenset({"optim", "models", "data", "linear"}),
    frozenset({"tasks", "task_targets", "scores", "spans", "config", "io", "errors", "checkpoints"}),
]

#: Longer modules must say why in their top docstring, with this phrase.
LINE_LIMIT = 350
LONG_MODULE_PHRASE = "Why this module is long:"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(module of ours, line) for every import in the file; ``from a import b`` names the
    module ``a.b`` when that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield (submodule if submodule in known else source), node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: first line}."""
    modules = package_modules()
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imported_modules(name, path, known):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def floor_of(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, floor in enumerate(FLOORS) if top in floor), None)


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    found = []
    for module, edges in graph.items():
        for target, line in edges.items():
            here, there = floor_of(module), floor_of(target)
            if here is not None and there is not None and there < here:
                found.append(f"{module}:{line} imports {target} (floor {there}, above its floor {here})")
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_every_module_has_a_floor() -> None:
    unplaced = sorted({m for m in package_modules() if floor_of(m) is None})
    assert not unplaced, f"place these in FLOORS of tests/test_layers.py: {', '.join(unplaced)}"


def test_imports_point_down() -> None:
    found = upward_imports(import_graph())
    assert not found, "upward imports:\n" + "\n".join(found)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_long_modules_say_why() -> None:
    found = []
    for name, path in package_modules().items():
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > LINE_LIMIT and LONG_MODULE_PHRASE not in docstring:
            found.append(f"{name}: {lines} lines")
    assert not found, f"modules over {LINE_LIMIT} lines without '{LONG_MODULE_PHRASE}' in their docstring: " + "; ".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from mtl_runner.config import validate", ["mtl_runner.config"]),
        ("from mtl_runner import io", ["mtl_runner.io"]),
        ("import mtl_runner.train.trainer as t", ["mtl_runner.train.trainer"]),
        ("def f():\n    from ..train import trainer", ["mtl_runner.train.trainer"]),
        ("from .base import Surgery", ["mtl_runner.optim.base"]),
        ("import torch\nfrom hydra import compose", []),
    ],
)
def test_import_parsing(tmp_path: Path, source: str, expected: list[str]) -> None:
    """Function-level and relative imports count; third-party ones do not."""
    path = tmp_path / "module.py"
    path.write_text(source)
    known = {"mtl_runner.io", "mtl_runner.train.trainer", "mtl_runner.optim.base"}
    assert [m for m, _ in imported_modules("mtl_runner.optim.module", path, known)] == expected


def test_cycle_detection() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
