"""The shape a newcomer relies on: imports inside ``biotune`` go one way (no cycle, lazy imports
inside functions included), no function runs over a screen, and ruff's complexity rule holds.

Fast and torch-free: it parses the source, it never imports biotune.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "biotune"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The biotune modules ``name`` imports anywhere in its file. ``from .x import y`` counts as
    importing ``x.y`` where that is a module, else ``x``. The root package (the facade that
    re-exports the API) is not counted, nor a parent package that Python runs on the way."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module not in ("biotune", name)}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def test_the_import_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "biotune.config" in graph["biotune.train"]
    assert "biotune.methods" in graph["biotune.fitness"] or "biotune.methods" in graph["biotune.experiment"]


def test_imports_inside_biotune_go_one_way():
    try:
        order = list(TopologicalSorter(import_graph()).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle in biotune: {' -> '.join(error.args[1])}")
    assert order


def test_no_function_in_biotune_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in modules().values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: split them\n" + "\n".join(long)


def test_ruff_complexity_rule_holds_for_biotune():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (make setup installs it)")
    checked = subprocess.run([ruff, "check", "--select", "C901", "--output-format", "concise", str(PACKAGE)],
                             capture_output=True, text=True, cwd=ROOT)
    assert checked.returncode == 0, checked.stdout + checked.stderr
