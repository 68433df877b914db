"""The study's two settings on the tiny parent: setting 1 (the random-init twin trains on the continued
model's budget) and setting 2 (`scratch_pipeline`: the twin trains on the whole pipeline's tokens, the
parent's pretraining tokens plus that budget). The budget of each kind in training, metrics.json, the
cards, the report, the plan of `--dry-run`, a sweep's shared twin, and the recipe check."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_recipe_yaml

from hfprune.cli import main
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import load_recipe
from hfprune.report.writer import write_report
from hfprune.seeds import Role, role_seed
from hfprune.sweep.grid import load_sweep
from hfprune.sweep.runner import run_sweep


PRETRAINED = 192  # the parent's pretraining tokens, as a recipe declares them
BUDGET = 128
TOKENS_PER_STEP = 4 * 16  # per-device batch x seq_len: both budgets are whole steps, so exact
TRAIN = f"""
train:
  runs: [continued, scratch, scratch_pipeline]
  token_budget: {BUDGET}
  seq_len: 16
  args: {{per_device_train_batch_size: 4, save_steps: 100, learning_rate: 1.0e-3}}
"""
WITH_PRETRAINED = [f"parent.pretrained_tokens={PRETRAINED}"]


@pytest.fixture(scope="module")
def settings_run(tmp_path_factory, tiny_parent_dir):
    """One shortgpt run training both settings' twins beside the continued model."""
    root = tmp_path_factory.mktemp("settings")
    path = root / "settings.yaml"
    prune = "prune:\n  method: shortgpt\n  ratio: 0.5\n"
    path.write_text(tiny_recipe_yaml("settings", root / "out", tiny_parent_dir, prune=prune) + TRAIN)
    recipe = load_recipe(path, WITH_PRETRAINED)
    return recipe, pipeline.run(recipe)


def training_report(recipe, kind: str) -> dict:
    return json.loads((recipe.output_path / "models" / kind / "training_report.json").read_text())


def test_each_kind_has_its_settings_budget(write_recipe):
    recipe = load_recipe(write_recipe(TRAIN), WITH_PRETRAINED)
    assert recipe.token_budget("continued") == recipe.token_budget("scratch") == BUDGET
    assert recipe.token_budget("scratch_pipeline") == PRETRAINED + BUDGET
    assert recipe.train_spec("scratch_pipeline").token_budget == PRETRAINED + BUDGET
    assert recipe.train_spec("scratch") == recipe.train  # setting 1 trains on the section as written
    assert recipe.train.token_budget == BUDGET  # the recipe itself is unchanged


def test_setting_2_without_the_parents_pretraining_tokens_is_refused(write_recipe):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(TRAIN))
    message = str(err.value)
    assert "scratch_pipeline" in message and "parent.pretrained_tokens" in message
    assert "parent.pretrain section" in message  # the other way to give them
    # Setting 1 alone needs no pretraining tokens.
    setting_1 = load_recipe(write_recipe(TRAIN), ["train.runs=[continued,scratch]"])
    assert setting_1.token_budget("scratch") == BUDGET


def test_setting_2_trains_on_the_pipelines_tokens_exactly(settings_run):
    recipe, summary = settings_run
    metrics = summary.metrics
    for kind, tokens, setting in (
        ("continued", BUDGET, 1),
        ("scratch", BUDGET, 1),
        ("scratch_pipeline", PRETRAINED + BUDGET, 2),
    ):
        assert metrics[kind]["tokens_trained"] == tokens, kind
        assert metrics[kind]["setting"] == setting, kind
        report = training_report(recipe, kind)
        assert report["token_budget"] == report["tokens_trained"] == tokens
        assert report["steps"] == tokens // TOKENS_PER_STEP
        assert "pydoc" in metrics[kind]["perplexity"]
    assert "setting" not in metrics["parent"] and "setting" not in metrics["pruned"]


def test_the_cards_say_which_setting_their_numbers_belong_to(settings_run):
    recipe, _ = settings_run
    card = {
        kind: (recipe.output_path / "models" / kind / "README.md").read_text()
        for kind in ("pruned", "continued", "scratch", "scratch_pipeline")
    }
    pipeline_card = " ".join(card["scratch_pipeline"].split())  # the template wraps lines anywhere
    assert "random-init baseline on the whole pipeline's budget** (setting 2 of the study)" in pipeline_card
    assert f"trained from scratch on {PRETRAINED + BUDGET} tokens" in pipeline_card
    assert (
        f"the parent's {PRETRAINED} pretraining tokens plus the continued budget of {BUDGET}" in pipeline_card
    )
    assert "- Study setting 2: the whole pipeline's tokens" in pipeline_card
    assert f"Token budget {PRETRAINED + BUDGET}; trained on {PRETRAINED + BUDGET} tokens" in pipeline_card
    front = yaml.safe_load(card["scratch_pipeline"].split("---")[1])
    assert "pipeline-budget" in front["tags"] and "base_model" not in front
    for kind in ("continued", "scratch"):
        assert (
            "- Study setting 1: the same token budget for the pruned start and its random-init" in card[kind]
        )
        assert f"Token budget {BUDGET}; trained on {BUDGET} tokens" in card[kind]
    assert "Study setting" not in card["pruned"]  # not trained
    # The twins name the seed they were initialised from: the twin's stream, not the recipe seed.
    twin_seed = role_seed(recipe.seed, Role.TWIN_INIT)
    for kind in ("scratch", "scratch_pipeline"):
        assert f"(seed {twin_seed}, the twin's stream of the recipe seed {recipe.seed})" in card[kind]


def test_the_report_marks_the_setting_2_column(settings_run):
    recipe, summary = settings_run
    data = write_report(recipe.output_path)
    assert data["settings"]["scratch"] == 1 and data["settings"]["scratch_pipeline"] == 2
    row = data["rows"][0]
    assert row["scratch_pipeline"] == summary.metrics["scratch_pipeline"]["perplexity"]["pydoc"]["value"]
    assert row["gap"] == pytest.approx(row["continued"] - row["scratch"])  # the gap stays setting 1's
    report = (recipe.output_path / "report.md").read_text()
    assert "| continued | scratch | scratch_pipeline (setting 2) |" in report
    assert "Columns marked (setting 2) trained on the whole pipeline's tokens" in report


def test_the_dry_run_plans_each_kind_on_its_own_budget(write_recipe):
    path = write_recipe(TRAIN)
    result = CliRunner().invoke(main, ["run", str(path), *WITH_PRETRAINED, "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # the readable plan goes to stderr
    budgets = {"continued": BUDGET, "scratch": BUDGET, "scratch_pipeline": PRETRAINED + BUDGET}
    assert plan["token_budgets"] == budgets
    assert "train_scratch_pipeline" in plan["stages"]
    stages = plan["plan"]["stages"]
    for kind, budget in budgets.items():
        assert f"x token_budget ({budget:,}) x" in stages[f"train_{kind}"]["flops_formula"]
    # Training FLOPs are proportional to the tokens: setting 2 costs (P + B) / B times setting 1.
    ratio = stages["train_scratch_pipeline"]["flops"] / stages["train_scratch"]["flops"]
    assert ratio == pytest.approx((PRETRAINED + BUDGET) / BUDGET)
    assert "token_budget (320)" in result.stderr  # the readable plan says it too


def test_a_twin_shared_in_a_sweep_keeps_its_setting(tmp_path, tiny_parent_dir):
    """Both depth methods keep 4 of 8 layers, so the second cell publishes the first cell's twin."""
    text = tiny_recipe_yaml("grid", tmp_path / "out" / "grid", tiny_parent_dir, max_windows=4)
    text = text.replace("parent:\n", f"parent:\n  pretrained_tokens: {PRETRAINED}\n", 1)
    sweep = "sweep:\n  method: [shortgpt, minitron_depth]\n  ratio: [0.5]\n"
    train = TRAIN.replace("[continued, scratch, scratch_pipeline]", "[scratch_pipeline]")
    path = tmp_path / "grid.yaml"
    path.write_text(text + textwrap.dedent(train) + sweep)
    grid = load_sweep(path)
    run_sweep(grid)
    donor, taker = (json.loads((grid.output_path / c.id / "metrics.json").read_text()) for c in grid.cells)
    assert taker["scratch_pipeline"]["shared_from"] == grid.cells[0].id
    assert donor["scratch_pipeline"]["setting"] == taker["scratch_pipeline"]["setting"] == 2
    assert taker["scratch_pipeline"]["tokens_trained"] == PRETRAINED + BUDGET
