"""The command line, driven through its entry point: exit codes, messages, nothing created on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from hfprune.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_invalid_recipe_exits_2_naming_every_problem_and_creates_nothing(write_recipe, tmp_path):
    path = write_recipe(extra="colour: blue\n", ratio=1.5, method="shortgtp")
    result = invoke("run", str(path))
    assert result.exit_code == 2
    for expected in ("colour: unknown key", "prune.ratio", "did you mean 'shortgpt'"):
        assert expected in result.output
    assert not (tmp_path / "out").exists()


def test_console_script_runs_a_recipe_and_skips_on_rerun(write_recipe, tmp_path):
    path = write_recipe()
    hfprune = Path(sys.executable).parent / "hfprune"
    first = subprocess.run([hfprune, "run", str(path)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "perplexity" in first.stdout and "parent" in first.stdout and "pruned" in first.stdout
    again = subprocess.run([hfprune, "run", str(path)], capture_output=True, text=True)
    assert again.returncode == 0
    assert "ran: nothing" in again.stdout
    assert (tmp_path / "out" / "tiny" / "models" / "pruned" / "model.safetensors").is_file()


def test_python_dash_m_works():
    done = subprocess.run([sys.executable, "-m", "hfprune", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "hfprune" in done.stdout


def test_overrides_on_the_command_line(write_recipe):
    result = invoke("prune", str(write_recipe()), "prune.ratio=0.75", "--dry-run")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # the readable plan goes to stderr
    assert plan["target_shape"] == {"num_hidden_layers": 2}
    assert plan["ratio"]["requested"] == 0.75
    assert list(plan["stages"]) == ["prune", "card"]


def test_missing_parent_exits_1_with_a_clear_message(write_recipe, tmp_path):
    result = invoke("run", str(write_recipe()), f"parent.model={tmp_path}/absent")
    assert result.exit_code == 1
    assert "parent.model" in result.output and "does not exist" in result.output
    assert not (tmp_path / "out").exists()


def test_validate_defaults_to_the_recipes_folder(monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent)
    # --no-files: the demo recipes read data that `hfprune assets` fetches, present or not on this machine.
    result = invoke("validate", "--no-files")
    assert result.exit_code == 0, result.output
    assert "ok       recipes/quickstart.yaml" in result.output


def test_validate_reports_bad_recipes(write_recipe):
    good, bad = write_recipe(), write_recipe(name="bad", method="nope")
    result = invoke("validate", str(good), str(bad))
    assert result.exit_code == 2
    assert "unknown method 'nope'" in result.output


def test_ls_lists_pruners_and_recipes(monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent)
    result = invoke("ls")
    assert result.exit_code == 0
    assert "shortgpt" in result.output and "depth" in result.output
    assert "quickstart.yaml" in result.output


def test_a_recipe_that_is_not_utf8_exits_2(write_recipe, tmp_path):
    path = write_recipe()
    path.write_bytes(path.read_bytes() + "# r\xe9sum\xe9\n".encode("latin-1"))
    result = invoke("run", str(path))
    assert result.exit_code == 2 and "not UTF-8 text: byte 0xe9" in result.output
    assert not (tmp_path / "out").exists()


def test_a_50_mb_recipe_exits_2_at_once(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.truncate(50 * 2**20)
    for command in ("run", "validate", "sweep"):
        result = invoke(command, str(path))
        assert result.exit_code == 2 and "too large for a recipe (52,428,800 bytes" in result.output


def test_malformed_overrides_exit_2_naming_each(write_recipe, tmp_path):
    overrides = ("prune.ratio=[0.5", "eval.perplexity.x=1", "eval.perplexity.5=1")
    result = invoke("run", str(write_recipe()), *overrides)
    assert result.exit_code == 2 and "3 problem(s)" in result.output
    for key in (
        "prune.ratio: the value '[0.5' is not valid YAML",
        "eval.perplexity.x: 'x' is not a list index",
    ):
        assert key in result.output
    assert "eval.perplexity.5: index 5 is out of range: eval.perplexity has 1 item(s)" in result.output
    assert not (tmp_path / "out").exists()


def test_a_zero_batch_size_exits_2_before_any_work(write_recipe, tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the recipe was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    expected = "train.args.per_device_train_batch_size: must be positive, got 0"
    path = write_recipe("train:\n  token_budget: 4096\n  seq_len: 64\n")
    result = invoke("run", str(path), "train.args.per_device_train_batch_size=0")
    assert result.exit_code == 2 and expected in result.output
    path.write_text(path.read_text() + "  args: {per_device_train_batch_size: 0}\n")
    result = invoke("validate", str(path))
    assert result.exit_code == 2 and expected in result.output
    assert not (tmp_path / "out").exists()
