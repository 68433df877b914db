"""Pre-flight: what the recipe, the file system and the parent's config can tell is reported before any
work, all at once, with exit 2, naming each key; nothing is created on disk and no weights load."""

from __future__ import annotations

import re

import pytest
import transformers
from click.testing import CliRunner
from conftest import tiny_recipe_yaml
from transformers import GPT2Config

from hfprune import distributed, hub
from hfprune.checks.preflight import output_problem, preflight
from hfprune.cli import main
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import load_recipe


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def weights_loaded(monkeypatch):
    """Every attempt to load weights, recorded and refused: the checks must come first."""
    calls: list[tuple] = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("weights were loaded before the pre-flight check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    return calls


TRAIN = """\
train:
  token_budget: 4096
  seq_len: 64
  args: {per_device_train_batch_size: 2}
"""


def assert_refused(result, tmp_path, weights_loaded, *keys: str) -> dict[str, str]:
    """Exit 2, every key named, nothing written under the output folder, no weights loaded."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    problems = dict(
        line.strip().split(": ", 1) for line in result.output.splitlines() if line.startswith("  ")
    )
    for key in keys:
        assert key in problems, result.output
    assert not (tmp_path / "out").exists()
    assert weights_loaded == []
    return problems


def test_sequence_lengths_longer_than_the_parents_positions(write_recipe, tmp_path, weights_loaded):
    path = write_recipe(TRAIN)
    result = invoke(
        "run", str(path), "train.seq_len=512", "calibration.seq_len=300", "eval.perplexity.0.seq_len=4096"
    )
    problems = assert_refused(
        result, tmp_path, weights_loaded, "train.seq_len", "calibration.seq_len", "eval.perplexity.0.seq_len"
    )
    assert problems["eval.perplexity.0.seq_len"].startswith("4096 is longer than the parent's 256 positions")
    assert "use at most 256" in problems["train.seq_len"]


def test_a_budget_smaller_than_one_optimizer_step(write_recipe, tmp_path, weights_loaded):
    result = invoke("run", str(write_recipe(TRAIN)), "train.token_budget=100")
    problems = assert_refused(result, tmp_path, weights_loaded, "train.token_budget")
    assert (
        "100 is smaller than one global batch (128 tokens = 2 per device x 1 accumulation"
        in (problems["train.token_budget"])
    )


def test_the_budget_counts_every_process(write_recipe, monkeypatch):
    recipe = load_recipe(write_recipe(TRAIN))
    preflight(recipe, parent=False)  # 4096 tokens: 32 steps of 2 x 64 on one process
    monkeypatch.setattr(distributed, "world_size", lambda: 64)  # as under torchrun, without a real group
    monkeypatch.setattr(distributed, "ensure_process_group", lambda: None)
    with pytest.raises(RecipeError, match="8192 tokens = 2 per device x 1 accumulation x 64 processes"):
        preflight(recipe, parent=False)


def test_local_dataset_files_missing_empty_or_folders(write_recipe, tmp_path, weights_loaded):
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    extra = TRAIN.replace(
        "seq_len: 64", f"seq_len: 64\n  dataset: {{path: json, data_files: {tmp_path}/gone.jsonl}}"
    )
    overrides = [
        f"calibration.dataset={{path: json, data_files: [{empty}]}}",
        f"eval.perplexity.0.dataset={{path: text, data_files: {{test: '{tmp_path}/*.txt'}}}}",
    ]
    result = invoke("run", str(write_recipe(extra)), *overrides)
    problems = assert_refused(
        result,
        tmp_path,
        weights_loaded,
        "train.dataset.data_files",
        "calibration.dataset.data_files",
        "eval.perplexity.0.dataset.data_files",
    )
    assert problems["train.dataset.data_files"] == f"{tmp_path}/gone.jsonl does not exist"
    assert problems["calibration.dataset.data_files"] == f"{empty} is empty"
    assert problems["eval.perplexity.0.dataset.data_files"] == f"{tmp_path}/*.txt matches no file"


def test_a_folder_given_as_a_data_file(write_recipe, tmp_path):
    recipe = load_recipe(
        write_recipe(), [f"eval.perplexity.0.dataset={{path: json, data_files: {tmp_path}}}"]
    )
    with pytest.raises(RecipeError, match="is a folder, not a file"):
        preflight(recipe, parent=False)


def test_hub_datasets_and_the_builtin_corpus_are_not_checked_locally(write_recipe):
    hub = "{path: allenai/c4, data_files: en/c4-train.00000-of-01024.json.gz}"
    recipe = load_recipe(write_recipe(), [f"eval.perplexity.0.dataset={hub}"])
    preflight(recipe, parent=False)


def test_an_output_dir_that_is_a_file(write_recipe, tmp_path, weights_loaded):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    result = invoke("run", str(write_recipe()), f"output_dir={taken}")
    problems = assert_refused(result, tmp_path, weights_loaded, "output_dir")
    assert problems["output_dir"].startswith(f"{taken} is a file, not a folder")
    assert taken.read_text() == "not a folder"


def test_an_output_dir_inside_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    assert output_problem(tmp_path / "file" / "run") == (
        f"{tmp_path / 'file'} is a file, so the output folder cannot be created inside it"
    )
    assert output_problem(tmp_path / "new" / "run") is None


def test_an_unsupported_architecture_from_its_config_alone(write_recipe, tmp_path, weights_loaded):
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(gpt2)  # a config, no weights at all
    result = invoke("run", str(write_recipe()), f"parent.model={gpt2}")
    problems = assert_refused(result, tmp_path, weights_loaded, "parent.model")
    assert "gpt2" in problems["parent.model"].lower()


def test_every_problem_at_once(write_recipe, tmp_path, weights_loaded):
    (tmp_path / "taken").write_text("")
    result = invoke(
        "run",
        str(write_recipe(TRAIN)),
        "train.seq_len=512",
        "train.token_budget=100",
        f"output_dir={tmp_path / 'taken'}",
        f"eval.perplexity.0.dataset={{path: json, data_files: {tmp_path}/gone.jsonl}}",
    )
    problems = assert_refused(
        result,
        tmp_path,
        weights_loaded,
        "train.seq_len",
        "train.token_budget",
        "output_dir",
        "eval.perplexity.0.dataset.data_files",
    )
    assert "4 problem(s)" in result.output and len(problems) == 4


def test_a_missing_parent_with_other_problems_reports_them_all(write_recipe, tmp_path, weights_loaded):
    result = invoke(
        "run", str(write_recipe(TRAIN)), f"parent.model={tmp_path}/absent", "train.token_budget=100"
    )
    problems = assert_refused(result, tmp_path, weights_loaded, "train.token_budget", "parent")
    assert "does not exist" in problems["parent"]


def test_prune_stops_before_training_so_train_is_not_checked(write_recipe, tmp_path):
    path = write_recipe(TRAIN)
    assert invoke("run", str(path), "train.seq_len=512", "--dry-run").exit_code == 2
    result = invoke("prune", str(path), "train.seq_len=512", "--dry-run")
    assert result.exit_code == 0, result.output


SWEEP = """\
sweep:
  method: [shortgpt, magnitude]
  token_budget: [100, 4096]
"""


@pytest.fixture
def write_sweep(tmp_path, tiny_parent_dir):
    """A sweep over two methods and two budgets (100 tokens is less than one 128-token step)."""
    text = tiny_recipe_yaml("grid", tmp_path / "out" / "grid", tiny_parent_dir, prune="prune: {ratio: 0.5}\n")
    path = tmp_path / "grid.yaml"
    path.write_text(text + TRAIN.replace("  token_budget: 4096\n", "") + SWEEP)
    return path


def test_a_sweep_checks_every_cell_and_names_them(write_sweep, tmp_path, weights_loaded):
    result = invoke("sweep", str(write_sweep), "eval.perplexity.0.seq_len=512")
    problems = assert_refused(
        result, tmp_path, weights_loaded, "train.token_budget", "eval.perplexity.0.seq_len"
    )
    assert problems["train.token_budget"].endswith("(cells: shortgpt-r0.5-t100, magnitude-r0.5-t100)")
    assert problems["eval.perplexity.0.seq_len"].endswith("(all 4 cells)")


def test_a_sweep_checks_only_the_selected_cells(write_sweep):
    result = invoke("sweep", str(write_sweep), "--only", "budget=4096", "--dry-run")
    assert result.exit_code == 0, result.output


def test_validate_checks_a_local_parent_by_default(write_recipe, tmp_path):
    good = write_recipe(TRAIN)
    result = invoke("validate", str(good))
    assert result.exit_code == 0 and f"ok       {good}\n" in result.output
    bad = write_recipe(TRAIN.replace("seq_len: 64", "seq_len: 512"), name="bad")
    result = invoke("validate", str(good), str(bad))
    assert result.exit_code == 2
    assert "train.seq_len: 512 is longer than the parent's 256 positions" in result.output
    assert not (tmp_path / "out").exists()


def test_validate_flags_choose_the_checks(write_recipe):
    text = TRAIN.replace("seq_len: 64", "seq_len: 512") + "  dataset: {path: json, data_files: gone.jsonl}\n"
    path = write_recipe(text)
    found = invoke("validate", str(path))
    assert found.exit_code == 2
    assert "train.seq_len: 512 is longer" in found.output
    assert "train.dataset.data_files: gone.jsonl (in " in found.output
    no_parent = invoke("validate", "--no-parent", str(path))
    assert no_parent.exit_code == 2
    assert "train.seq_len" not in no_parent.output and "train.dataset.data_files" in no_parent.output
    neither = invoke("validate", "--no-parent", "--no-files", str(path))
    assert neither.exit_code == 0 and "parent config not checked" in neither.output


def test_validate_reads_a_hub_parents_config_only_when_asked(write_recipe, monkeypatch):
    path = write_recipe(TRAIN)
    path.write_text(re.sub(r"model: .*", "model: org/model", path.read_text(), count=1))

    def network(*args, **kwargs):
        raise AssertionError("the parent's config was fetched without --parent")

    monkeypatch.setattr(hub, "load_parent_config", network)
    result = invoke("validate", str(path))
    assert result.exit_code == 0 and "parent config not checked" in result.output
    monkeypatch.undo()
    fetched = invoke("validate", "--parent", str(path))  # the Hub is offline in tests: a run-time failure
    assert fetched.exit_code == 1 and "cannot load the parent config from 'org/model'" in fetched.output


def test_validate_a_sweep_checks_its_cells(write_sweep):
    result = invoke("validate", str(write_sweep))
    assert result.exit_code == 2
    assert "train.token_budget: 100 is smaller than one global batch" in result.output
    assert "(cells: shortgpt-r0.5-t100, magnitude-r0.5-t100)" in result.output
