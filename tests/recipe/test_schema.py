"""The recipe contract: strict schema, every problem reported at once with its key path, typed overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import Recipe, load_recipe


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


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return dict(info.value.problems)


def test_a_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MINIMAL.encode() + "# café\n".encode("latin-1"))
    assert problems_of(path) == {"": "not UTF-8 text: byte 0xe9 at line 4 (save the file as UTF-8)"}


def test_a_recipe_over_the_size_cap_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.truncate(50 * 2**20)  # 50 MB that today's parser would read for minutes

    def no_read(*args, **kwargs):
        raise AssertionError("a recipe over the cap was opened")

    monkeypatch.setattr(Path, "open", no_read)
    message = problems_of(path)[""]
    assert message.startswith("too large for a recipe (52,428,800 bytes; at most 1,048,576 bytes)")


def test_a_stream_without_a_size_is_read_only_up_to_the_cap(tmp_path, monkeypatch):
    from hfprune.recipe import loading as recipe_raw

    monkeypatch.setattr(recipe_raw, "MAX_RECIPE_BYTES", 64)
    assert problems_of(Path("/dev/zero"))[""].startswith("too large for a recipe (at most 64 bytes)")


def test_folders_aliases_and_nesting_are_refused_with_a_message(tmp_path):
    assert problems_of(tmp_path) == {"": "is a directory, not a recipe file"}
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(5)
    )
    assert "expands to more than 100,000 values" in problems_of(write(tmp_path, MINIMAL + bomb))[""]
    deep = MINIMAL + "x: " + "[" * 5000 + "]" * 5000 + "\n"
    assert problems_of(write(tmp_path, deep)) == {"": "not valid YAML: nested too deeply"}


def test_malformed_overrides_name_the_key_and_what_is_allowed(tmp_path):
    text = MINIMAL + "eval:\n  perplexity:\n    - {name: a, dataset: {path: 'hfprune:pydoc_topics'}}\n"
    overrides = (
        "prune.ratio=[0.5",
        "eval.perplexity.x=1",
        "eval.perplexity.5=1",
        "eval.perplexity.-1.seq_len=8",
        "seed.x=1",
    )
    problems = problems_of(write(tmp_path, "seed: 3\n" + text), overrides)
    assert problems["prune.ratio"].startswith("the value '[0.5' is not valid YAML (")
    assert problems["prune.ratio"].endswith("quote it to pass text")
    assert (
        problems["eval.perplexity.x"]
        == "'x' is not a list index: eval.perplexity is a list (indices: 0 to 0)"
    )
    assert problems["eval.perplexity.5"] == (
        "index 5 is out of range: eval.perplexity has 1 item(s) (indices: 0 to 0)"
    )
    assert "'-1' is not a list index" in problems["eval.perplexity.-1.seq_len"]
    assert problems["seed.x"] == "cannot set this key: seed is a value (3), not a section"
    assert len(problems) == 5


def test_overrides_index_lists_and_fill_empty_sections(tmp_path):
    text = (
        MINIMAL + "train:\neval:\n  perplexity:\n    - {name: a, dataset: {path: 'hfprune:pydoc_topics'}}\n"
    )
    recipe = load_recipe(write(tmp_path, text), ["eval.perplexity.0.seq_len=64", "train.token_budget=4096"])
    assert recipe.eval.perplexity[0].seq_len == 64
    assert recipe.train is not None and recipe.train.token_budget == 4096


TRAIN = "train:\n  token_budget: 4096\n  seq_len: 64\n  args: {%s}\n"


@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        ("per_device_train_batch_size: 0", "per_device_train_batch_size", "must be positive, got 0"),
        ("gradient_accumulation_steps: 1.5", "gradient_accumulation_steps", "must be an integer, got 1.5"),
        ("save_steps: 0", "save_steps", "must be positive, got 0"),
        ("bf16: 'yes'", "bf16", "must be true or false, got 'yes'"),
        (
            "learning_rate: 3e-4",
            "learning_rate",
            "must be a number, got '3e-4' (YAML reads 3e-4 as text: write it with a dot, e.g. 3.0e-4)",
        ),
        ("logging_steps: 0", "logging_steps", "rejected by transformers.TrainingArguments: logging strategy"),
        (
            "optim: adamw_nope",
            "optim",
            "rejected by transformers.TrainingArguments: adamw_nope is not a valid",
        ),
    ],
)
def test_train_args_are_checked_by_building_the_training_arguments(tmp_path, args, key, message):
    problems = problems_of(write(tmp_path, MINIMAL + TRAIN % args))
    assert list(problems) == [f"train.args.{key}"]
    assert problems[f"train.args.{key}"].startswith(message)


def test_train_args_problems_come_with_the_others_and_leave_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = MINIMAL.replace("ratio: 0.5", "ratio: 2") + TRAIN % "per_device_train_batch_size: 0"
    problems = problems_of(write(tmp_path, text))
    assert set(problems) == {"prune.ratio", "train.args.per_device_train_batch_size"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_budget_below_one_step_is_left_to_preflight(tmp_path):
    # The budget depends on the number of processes: `hfprune.checks.preflight` judges it, with the rest.
    recipe = load_recipe(
        write(tmp_path, MINIMAL + TRAIN % "per_device_train_batch_size: 2"), ["train.token_budget=10"]
    )
    assert recipe.train is not None and recipe.train.token_budget == 10


TRAIN_SECTION = """
train:
  token_budget: 2000
  seq_len: 32
  args: {per_device_train_batch_size: 4}
"""


def test_the_quickstart_fingerprints_are_pinned():
    # The pruning inputs are those of commit 33a7347, before parent.pretrain, parent.pretrained_tokens and
    # train.schedule existed: a finished quickstart prune stays current. Training and evaluation changed
    # since, on purpose: training reads a full permutation of its dataset (`train.shuffle_buffer` unset,
    # was a 1,000-document buffer) and capped evaluation windows are spread over the whole set
    # (`window_selection`, was the head), so their earlier results are no longer current.
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "quickstart.yaml")
    assert recipe.fingerprint("train") == "a25c5aba9f8f39bb"  # 726b69b0c5666a86 with the buffer
    assert recipe.fingerprint("parent", "prune", "calibration", "seed") == "d1334e8bbcb43326"
    assert recipe.fingerprint("parent", "eval") == "3dd4fdad7ff96cb4"  # 1d72482838c988cc with the head


def test_unset_recovery_settings_leave_the_train_fingerprint_as_before(write_recipe):
    import hashlib
    import json

    recipe = load_recipe(write_recipe(TRAIN_SECTION))
    dump = recipe.model_dump(mode="json")["train"]
    assert dump["distill"] is None and dump["lora"] is None
    del dump["distill"], dump["lora"], dump["schedule"]  # the train section before these settings existed
    before = hashlib.sha256(json.dumps({"train": dump}, sort_keys=True).encode()).hexdigest()[:16]
    assert recipe.fingerprint("train") == before
    distilled = load_recipe(write_recipe(TRAIN_SECTION + "  distill: {alpha: 0.5}\n"))
    assert distilled.fingerprint("train") != before
