"""Every YAML in recipes/ (sweeps included) validates and opens with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfprune.grid import load_sweep
from hfprune.recipe import load_recipe, read_recipe_yaml


RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "depth_0.5.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid_and_documents_its_command(path):
    command = "sweep" if "sweep" in read_recipe_yaml(path) else "run"
    if command == "sweep":
        assert load_sweep(path).cells
    else:
        load_recipe(path)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert header and path.read_text().startswith("#")
    assert any(f"hfprune {command} recipes/{path.name}" in line for line in header)
