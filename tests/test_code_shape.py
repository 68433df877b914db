"""The house rules for hfprune's own code: small modules, classes and functions.

No module over 300 lines (the registry tables of `hfprune/architectures/` and `hfprune/kinds.py` are
code like any other, so they count), no class over 250 lines, no function over 50 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "hfprune"
SOURCES = sorted(PACKAGE.rglob("*.py"))
LIMITS = {"module": 300, "class": 250, "function": 50}


def _oversized(path: Path) -> list[str]:
    source = path.read_text()
    found = []
    if len(source.splitlines()) > LIMITS["module"]:
        found.append(f"module {path.name}: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
        kind = (
            "class"
            if isinstance(node, ast.ClassDef)
            else "function"
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            else None
        )
        if kind and node.end_lineno - node.lineno + 1 > LIMITS[kind]:
            found.append(f"{kind} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_classes_and_functions_stay_small(path):
    assert _oversized(path) == []


def test_the_rule_sees_an_oversized_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    path = tmp_path / "big.py"
    path.write_text(f"def big():\n{body}\n")
    assert _oversized(path) == ["function big: 61 lines"]
