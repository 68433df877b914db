"""Every YAML in recipes/ (sweeps included) validates and opens with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfprune.recipe.loading import read_recipe_yaml
from hfprune.recipe.schema import load_recipe
from hfprune.sweep.grid import load_sweep


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


def test_the_pico_study_dry_run_lists_both_settings_and_its_branch_plan(tmp_path, monkeypatch):
    """`hfprune sweep recipes/pico_study.yaml --dry-run`: every cell of every seed replicate with both
    settings' budgets (setting 2 = the parent's pretraining tokens + the cell's budget), a parent and a
    control per seed, and a branch plan cheaper than training every budget from the start; from the
    recipe alone (no parent exists yet)."""
    import json

    from click.testing import CliRunner

    from hfprune.cli import main

    recipe = next(p for p in RECIPES if p.name == "pico_study.yaml")
    monkeypatch.chdir(tmp_path)  # the sweep folder (runs/pico_study) does not exist here
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    pretrained = load_sweep(recipe).cells[0].recipe.parent.pretrained_tokens
    assert (
        len(plan["cells"]) == 3 * 2 * 3 * 3 and not (tmp_path / "runs").exists()
    )  # methods x ratios x budgets x seeds
    assert [entry["seed"] for entry in plan["seeds"]] == [0, 1, 2]
    assert len({entry["parent"] for entry in plan["seeds"]}) == 3  # each seed pretrains its own parent
    assert [control["seed"] for control in plan["controls"]] == [0, 1, 2]
    assert sorted({cell["seed"] for cell in plan["cells"]}) == [0, 1, 2]
    for cell in plan["cells"]:
        budgets = {(run["kind"], run["setting"]): run["token_budget"] for run in cell["trained"]}
        assert budgets == {
            ("continued", 1): cell["token_budget"],
            ("scratch", 1): cell["token_budget"],
            ("scratch_pipeline", 2): pretrained + cell["token_budget"],
        }
    branched = sum(p["total_tokens"] for p in plan["branch_plans"])
    from_start = sum(p["from_start_tokens"] for p in plan["branch_plans"])
    assert 0 < branched < 0.7 * from_start
    assert all(p["warmup_steps"] < p["branches"][0]["branch_step"] for p in plan["branch_plans"])
