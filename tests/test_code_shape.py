"""The house rules for hfprune's own code, read from the source tree.

- The folder tree is the architecture: at most a dozen modules directly in `hfprune/`, and no family of
  three or more modules sharing a name prefix in one folder (a family is a subpackage).
- A module is one idea: up to 500 lines when cohesive; functions stay short (50 lines).
- No import cycle between hfprune's modules, counting every import: at the top, inside functions and
  under `TYPE_CHECKING` (each still ties the modules together), registries included.
- No re-export shims: `from hfprune.x import name` names the module that defines `name`.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "hfprune"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULE_LINES = 500
FUNCTION_LINES = 50
TOP_LEVEL_MODULES = 12
# Public APIs a package's __init__ promises in the README: imported from there on purpose.
PACKAGE_API = {"hfprune.callbacks"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SOURCES}


def _oversized(path: Path) -> list[str]:
    source = path.read_text()
    found = []
    if len(source.splitlines()) > MODULE_LINES:
        found.append(f"module {path.name}: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > FUNCTION_LINES:
                found.append(f"function {node.name}: {length} lines")
    return found


def imports_of(path: Path) -> set[str]:
    """Every hfprune module `path` imports, wherever the import statement sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hfprune")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hfprune"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found & MODULES.keys()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_cohesive_and_functions_short(path):
    assert _oversized(path) == []


def test_the_rule_sees_an_oversized_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    path = tmp_path / "big.py"
    path.write_text(f"def big():\n{body}\n")
    assert _oversized(path) == ["function big: 61 lines"]


def test_the_top_of_the_package_holds_a_dozen_modules_at_most():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_MODULES, top


@pytest.mark.parametrize(
    "folder", sorted({p.parent for p in SOURCES}), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_folder_holds_a_prefix_family(folder):
    stems = [p.stem for p in folder.glob("*.py") if not p.stem.startswith("__")]
    prefixes = Counter(stem.lstrip("_").split("_")[0] for stem in stems if "_" in stem.lstrip("_"))
    families = {prefix: n for prefix, n in prefixes.items() if n + (prefix in stems) >= 3}
    assert families == {}, f"{folder.name}/: modules sharing a prefix belong in a subpackage: {families}"


def test_no_module_imports_itself_back_through_others():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_from_import_names_the_module_that_defines_the_name():
    defined = {name: defined_names(path) for name, path in MODULES.items()}
    shims = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                not isinstance(node, ast.ImportFrom)
                or node.module not in defined
                or node.module in PACKAGE_API
            ):
                continue
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES or alias.name in defined[node.module]:
                    continue
                if alias.name != "__version__":
                    shims.append(f"{name}: from {node.module} import {alias.name}")
    assert shims == []
