"""The held-out check: evaluation sets that read calibration or training text are found, held-out ones are not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hfprune.checks.heldout import held_out_split, overlap_problems
from hfprune.recipe.loading import read_recipe_yaml
from hfprune.recipe.schema import Recipe, load_recipe, validate_recipe
from hfprune.sweep.grid import load_sweep


RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
PYDOC_TRAIN = {"path": "hfprune:pydoc_topics", "split": "train"}
PYDOC_TEST = {"path": "hfprune:pydoc_topics", "split": "test"}
WIKITEXT = "Salesforce/wikitext"


def recipe(
    calibration: dict[str, Any],
    *evals: dict[str, Any],
    train: dict[str, Any] | None = None,
    max_windows: int | None = 4,
) -> Recipe:
    raw: dict[str, Any] = {
        "name": "t",
        "parent": {"model": "x"},
        "prune": {"method": "shortgpt", "ratio": 0.5},
        "calibration": {"dataset": calibration, "num_samples": 8, "seq_len": 129},
        "eval": {
            "perplexity": [
                {"name": f"set{i}", "dataset": spec, "seq_len": 129, "max_windows": max_windows}
                for i, spec in enumerate(evals)
            ]
        },
    }
    if train is not None:
        raw["train"] = {"token_budget": 1000, **train}
    return validate_recipe(raw, "test")


def keys(problems: list[tuple[str, str]]) -> list[str]:
    return [key for key, _ in problems]


def test_evaluation_on_the_calibration_text_is_reported_with_its_key():
    problems = overlap_problems(recipe(PYDOC_TRAIN, PYDOC_TEST, PYDOC_TRAIN))
    assert keys(problems) == ["eval.perplexity.1.dataset"]
    message = problems[0][1]
    assert "evaluation set 'set1'" in message and "calibration data" in message and "split: test" in message


def test_wikitext_103_train_contains_wikitext_2_train_but_not_its_test_split():
    calibration = {"path": WIKITEXT, "name": "wikitext-103-raw-v1", "split": "train"}
    train_split = {"path": WIKITEXT, "name": "wikitext-2-raw-v1", "split": "train"}
    test_split = {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}  # `wikitext` is an alias
    problems = overlap_problems(recipe(calibration, train_split, test_split))
    assert keys(problems) == ["eval.perplexity.0.dataset"]
    assert "wikitext-103-raw-v1" in problems[0][1]


def test_shared_validation_articles_across_wikitext_configs_are_reported():
    calibration = {"path": WIKITEXT, "name": "wikitext-103-v1", "split": "test"}
    evaluation = {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    assert keys(overlap_problems(recipe(calibration, evaluation))) == ["eval.perplexity.0.dataset"]


def test_local_files_compare_by_file_whatever_the_split_is_called(tmp_path):
    train_file, test_file = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
    calibration = {"path": "json", "data_files": train_file}
    same = {"path": "json", "data_files": [str(tmp_path / "." / "train.jsonl")], "split": "validation"}
    other = {"path": "json", "data_files": test_file}
    by_split = {"path": "json", "data_files": {"test": test_file, "train": train_file}, "split": "test"}
    problems = overlap_problems(recipe(calibration, same, other, by_split))
    assert keys(problems) == ["eval.perplexity.0.dataset"]
    assert "train.jsonl" in problems[0][1]


def test_a_hub_shard_belongs_to_the_split_its_file_name_carries():
    shard = {"path": "allenai/c4", "name": "en", "data_files": "en/c4-train.00000-of-01024.json.gz"}
    whole_train = {"path": "allenai/c4", "name": "en", "split": "train"}
    validation = {"path": "allenai/c4", "name": "en", "split": "validation"}
    validation_shard = {
        "path": "allenai/c4",
        "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        "split": "validation",
    }
    problems = overlap_problems(recipe(shard, whole_train, validation, validation_shard))
    assert keys(problems) == ["eval.perplexity.0.dataset"]


def test_training_text_overlaps_unless_a_source_order_offset_skips_past_the_evaluation_windows():
    # A streamed evaluation set capped at 4 windows of 128 tokens reads its first 8 x 4 x 128 = 4,096 tokens.
    calibration, streamed = PYDOC_TRAIN, {**PYDOC_TEST, "streaming": True}
    shuffled = {"dataset": PYDOC_TEST, "skip_tokens": 1_000_000}
    assert keys(overlap_problems(recipe(calibration, streamed, train=shuffled))) == [
        "eval.perplexity.0.dataset"
    ]
    in_order = {"dataset": PYDOC_TEST, "skip_tokens": 4400, "shuffle_buffer": 1}
    assert overlap_problems(recipe(calibration, streamed, train=in_order)) == []
    too_close = {"dataset": PYDOC_TEST, "skip_tokens": 4200, "shuffle_buffer": 1}  # within the 5% margin
    problems = overlap_problems(recipe(calibration, streamed, train=too_close))
    assert keys(problems) == ["eval.perplexity.0.dataset"] and "training data" in problems[0][1]


def test_capped_windows_spread_over_the_whole_set_so_no_offset_holds_them_out():
    train = {"dataset": PYDOC_TEST, "skip_tokens": 10**9, "shuffle_buffer": 1}
    assert keys(overlap_problems(recipe(PYDOC_TRAIN, PYDOC_TEST, train=train))) == [
        "eval.perplexity.0.dataset"
    ]


def test_an_unbounded_evaluation_set_overlaps_any_later_offset():
    streamed = {**PYDOC_TEST, "streaming": True}
    train = {"dataset": PYDOC_TEST, "skip_tokens": 10**9, "shuffle_buffer": 1}
    assert overlap_problems(recipe(PYDOC_TRAIN, streamed, train=train)) == []
    unbounded = recipe(PYDOC_TRAIN, streamed, train=train, max_windows=None)
    assert keys(overlap_problems(unbounded)) == ["eval.perplexity.0.dataset"]


def shipped_recipes(path: Path) -> list[Recipe]:
    if "sweep" in read_recipe_yaml(path):
        return [cell.recipe for cell in load_sweep(path).cells]
    return [load_recipe(path)]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_evaluates_on_held_out_text(path):
    for each in shipped_recipes(path):
        assert overlap_problems(each) == []


@pytest.mark.parametrize(
    ("name", "override", "key"),
    [
        ("flap_0.5.yaml", "eval.perplexity.0.dataset.split=train", "eval.perplexity.0.dataset"),
        ("depth_0.5.yaml", "eval.perplexity.0.dataset.split=train", "eval.perplexity.0.dataset"),
        (
            "quickstart.yaml",
            "eval.perplexity.0.dataset.data_files=.cache/hfprune/shakespeare/train.jsonl",
            "eval.perplexity.0.dataset",
        ),
    ],
)
def test_shipped_recipes_with_their_old_evaluation_text_are_caught(name, override, key):
    path = next(p for p in RECIPES if p.name == name)
    assert key in keys(overlap_problems(load_recipe(path, [override])))


def test_the_c4_evaluation_of_the_sparse_recipes_was_their_calibration_shard():
    path = next(p for p in RECIPES if p.name == "wanda_0.5.yaml")
    override = "eval.perplexity.1.dataset.data_files=en/c4-train.00000-of-01024.json.gz"
    assert keys(overlap_problems(load_recipe(path, [override, "eval.perplexity.1.dataset.split=train"]))) == [
        "eval.perplexity.1.dataset"
    ]


def test_held_out_split_defaults_for_evaluation_sets():
    assert held_out_split("wikitext") == held_out_split("Salesforce/wikitext") == "test"
    assert held_out_split("allenai/c4") == "validation"
    assert held_out_split("hfprune:pydoc_topics") == "test"
    assert held_out_split("json", "hamlet.jsonl") == "train"  # local files are their own text
    assert held_out_split("someone/unknown-corpus") is None  # the recipe must name the split
