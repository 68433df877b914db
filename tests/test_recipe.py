"""The recipe contract: strict schema, every problem reported at once with its key path, typed overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfprune.recipe import Recipe, RecipeError, load_recipe


MINIMAL = "name: r\nparent: {model: some/model}\nprune: {method: shortgpt, ratio: 0.5}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert isinstance(recipe, Recipe)
    assert recipe.output_path == Path("runs/r")
    assert recipe.parent.trust_remote_code is False
    assert recipe.calibration.dataset.path == "hfprune:pydoc_topics"
    assert recipe.eval.perplexity[0].dataset.split == "test"


def test_every_problem_is_reported_with_its_path(tmp_path):
    text = "name: r\nparent: {model: m, colour: blue}\nprune: {method: shortgtp, ratio: 1.5}\n"
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    problems = dict(info.value.problems)
    assert problems["parent.colour"] == "unknown key"
    assert "less than 1" in problems["prune.ratio"]
    assert "did you mean 'shortgpt'" in problems["prune.method"]
    assert len(problems) == 3


def test_missing_required_sections(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "seed: 1\n"))
    assert {p for p, _ in info.value.problems} == {"name", "parent", "prune"}


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["prune.ratio=0.6", "seed=1", "name=123", "calibration.num_samples=8"])
    assert recipe.prune.ratio == 0.6
    assert recipe.seed == 1
    assert recipe.name == "123"  # a string field keeps the text, even when it looks like a number
    assert recipe.calibration.num_samples == 8


def test_bad_overrides_are_reported(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["prune.ratio=0", "nonsense", "prune.wat=1"])
    problems = dict(info.value.problems)
    assert "nonsense" in problems
    assert problems["prune.wat"] == "unknown key"
    assert "greater than 0" in problems["prune.ratio"]


def test_pruner_options_are_validated_by_the_pruner(tmp_path):
    text = MINIMAL.replace("ratio: 0.5}", "ratio: 0.5, options: {colour: 1}}")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    assert dict(info.value.problems) == {"prune.options.colour": "unknown option"}


def test_unreadable_files(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [\n"))


def test_fingerprint_tracks_only_named_sections(tmp_path):
    base = load_recipe(write(tmp_path, MINIMAL))
    changed = load_recipe(write(tmp_path, MINIMAL), ["eval.batch_size=2"])
    assert base.fingerprint("prune", "parent") == changed.fingerprint("prune", "parent")
    assert base.fingerprint("eval") != changed.fingerprint("eval")
