"""The core's folders follow the data flow: every import points down the stack, and none loops.

The order is the one in ``LiverSegmentationLogic/__init__.py``; a module may import its own folder
and the folders below it, never one above. Function-level (lazy) imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "LiverSegmentationLogic"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE
# bottom to top; the package root (``__version__``) and ``errors`` may be imported by everyone
LAYERS = ["", "errors", "processes", "io", "models", "readouts", "inference", "studies", "training", "remote", "cli"]


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the package's modules that ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` where one exists
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            found |= subs or {base}
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "")


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def test_every_folder_and_module_has_a_place_in_the_order():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    files = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert folders | files == set(LAYERS) - {""}


@pytest.mark.parametrize("folder", [f for f in LAYERS if (ROOT / f / "__init__.py").is_file() and f])
def test_each_folder_says_what_enters_and_what_leaves(folder):
    doc = ast.get_docstring(ast.parse((ROOT / folder / "__init__.py").read_text())) or ""
    assert "Enters:" in doc and "Leaves:" in doc, folder


def test_imports_point_down_the_stack():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
              if t not in MODULES and t != PACKAGE or layer_of(t) > layer_of(m)]
    assert not upward, "imports into a higher layer (or of a module that does not exist):\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (empty if there is none)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_cycles():
    assert find_cycle(GRAPH) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checks above would fail on a bad tree (so a passing run means something)."""
    bad = dict(GRAPH)
    bad[f"{PACKAGE}.io.volumes"] = GRAPH[f"{PACKAGE}.io.volumes"] | {f"{PACKAGE}.remote.server"}
    assert any(layer_of(t) > layer_of(m) for m, ts in bad.items() for t in ts)
    bad[f"{PACKAGE}.remote.server"] = GRAPH[f"{PACKAGE}.remote.server"] | {f"{PACKAGE}.io.volumes"}
    assert find_cycle(bad)[0] == find_cycle(bad)[-1]
