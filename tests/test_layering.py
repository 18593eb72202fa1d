"""The package's modules import each other in one direction only (ARCHITECTURE.md): the ground floor
(``dilated_attention_pattern``, and ``triton_support`` which the two Triton backends share) imports nothing of the
package, each backend imports only the floor, the entry point imports the backends, and no chain of imports, lazy
ones inside functions included, comes back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

import modeling_longnet

PACKAGE_DIR = Path(modeling_longnet.__file__).parent
FLOOR = ("dilated_attention_pattern", "triton_support")
BACKENDS = (
    "dilated_attention_torch", "dilated_attention_triton", "dilated_attention_cudnn", "dilated_attention_flash",
    "dilated_attention_dense", "dilated_attention_decode",
)


def package_imports(module: str) -> set[str]:
    """The package modules that ``module`` imports anywhere in its file (``from .x import y`` and ``from . import y``)."""
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found - {module}


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")


def test_the_ground_floor_imports_nothing_of_the_package():
    for module in FLOOR:
        assert package_imports(module) == set(), module


def test_each_backend_imports_only_the_ground_floor():
    for backend in BACKENDS:
        assert package_imports(backend) <= set(FLOOR), backend


def test_the_entry_point_is_above_every_backend():
    assert set(BACKENDS) <= package_imports("dilated_attention")


def test_no_import_cycle():
    graph = {module: package_imports(module) - {"__init__"} for module in modules()}
    # importing the package itself (``from . import x``) counts as importing __init__, which imports the model
    # modules: every such edge is an edge to each module __init__ imports
    init_imports = package_imports("__init__")
    for module in graph:
        graph[module] = {m for m in graph[module] if m in graph} | (init_imports if "__init__" in package_imports(module) else set())
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycle = path[path.index(imported):] + [module, imported] if imported in path else [module, imported]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                visit(imported, path + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
