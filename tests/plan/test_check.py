"""The plan wired into the command line: the dry run's per-stage memory and time, a run refused (exit 2,
naming the knob) on a stated machine too small for it before any weight loads, the sweep's dry run
reading the parent config once, and the held-out warning of `validate`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner
from conftest import tiny_recipe_yaml

from hfprune import hub
from hfprune.cli import main
from hfprune.models import config_cache
from hfprune.plan.estimate import DEVICE_RESERVE, plan_recipe
from hfprune.plan.hardware import GIB, Hardware, parse_size, stated_hardware
from hfprune.recipe.schema import load_recipe


ROOT = Path(__file__).resolve().parents[2]
LLAMA_8B = ROOT / "tests/data/llama-3.1-8b-config"
BIG = Hardware("big (test)", 1, 10**15, None, {"bfloat16": 1e15, "float32": 1e14}, "test")


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, env=env)


@pytest.fixture
def weights_loaded(monkeypatch):
    """Every attempt to load weights, recorded and refused: the plan must come first."""
    calls: list[tuple] = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("weights were loaded before the plan")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    return calls


def test_sizes_and_stated_machines():
    assert parse_size("80GiB") == 80 * GIB and parse_size("80 GB") == 80 * 10**9 and parse_size("512") == 512
    with pytest.raises(ValueError, match="80GiB"):
        parse_size("eighty")
    h100 = stated_hardware("h100-80gb", host_memory=64 * GIB)
    assert (h100.device_memory, h100.host_memory) == (80 * 10**9, 64 * GIB)
    assert "stated" in h100.source


def test_dry_run_prints_per_stage_memory_and_time_for_one_80gb_gpu(tmp_path, weights_loaded):
    result = invoke(
        "run",
        str(ROOT / "recipes/depth_0.5.yaml"),
        f"parent.model={LLAMA_8B}",
        f"output_dir={tmp_path / 'out'}",
        "--dry-run",
        "--hardware",
        "h100-80gb",
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["fits"] and plan["problems"] == []
    assert list(plan["stages"]) == ["parent_eval", "prune", "pruned_eval"]
    parent_eval = plan["stages"]["parent_eval"]
    # By hand: 8,030,261,248 bf16 weights, and one 8192-token window's logits at 14 B per vocab entry.
    assert parent_eval["device_bytes"] == 8_030_261_248 * 2 + 8192 * 128_256 * 14
    assert parent_eval["host_bytes"] == GIB + 256 * 8192 * 8  # baseline + the largest set's token ids
    # Time: 2 sets x 256 windows x 8192 tokens x forward FLOPs per token, at 40% of 989 TFLOP/s.
    assert parent_eval["seconds"] == pytest.approx(parent_eval["flops"] / (0.4 * 989e12), rel=1e-3)
    assert parent_eval["time_class"] == "minutes"
    assert plan["hardware"]["device_memory"] == 80 * 10**9
    table = result.stderr
    assert "parent_eval" in table and "pruned_eval" in table and "weights: P x b" in table
    assert not (tmp_path / "out").exists() and weights_loaded == []


def test_a_run_too_large_for_the_stated_machine_exits_2_naming_the_knob(
    write_recipe, tmp_path, weights_loaded
):
    path = write_recipe()
    recipe = load_recipe(path)
    stage = plan_recipe(recipe, hub.load_parent_config(recipe.parent), BIG).stage("parent_eval")
    logits = next(t.bytes for t in stage.device if t.name == "logits and loss")
    # Room for the weights and half the logits of a batch of 4: a batch of 2 fits.
    device = DEVICE_RESERVE + stage.total("device") - logits // 2
    result = invoke("run", str(path), env={"HFPRUNE_DEVICE_MEMORY": str(device)})
    assert result.exit_code == 2, result.output
    assert "does not fit this machine" in result.stderr
    assert "eval.batch_size: parent_eval needs" in result.stderr
    assert "lower eval.batch_size from 4 to at most 2" in result.stderr
    assert not (tmp_path / "out").exists() and weights_loaded == []
    # `hfprune prune` plans the stages it runs: the prune stage alone fits the same machine.
    dry = invoke("prune", str(path), "--dry-run", "--device-memory", str(device))
    assert dry.exit_code == 0, dry.output
    assert list(json.loads(dry.stdout)["plan"]["stages"]) == ["prune"]


def test_a_dry_run_that_does_not_fit_prints_its_problems_instead_of_refusing(write_recipe, weights_loaded):
    result = invoke("run", str(write_recipe()), "--dry-run", "--device-memory", "1GiB")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert not plan["fits"]
    assert {p["key"] for p in plan["problems"]} >= {"parent.dtype"}


def test_sweep_dry_run_reads_the_parent_config_once_and_shows_each_cells_plan(
    tmp_path, tiny_parent_dir, monkeypatch, weights_loaded
):
    reads: list[str] = []
    real = transformers.AutoConfig.from_pretrained

    class CountingConfig:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            reads.append(args[0])
            return real(*args, **kwargs)

    monkeypatch.setattr(hub, "AutoConfig", CountingConfig)
    monkeypatch.setattr(config_cache, "_CONFIGS", {})
    text = tiny_recipe_yaml("grid", tmp_path / "out", tiny_parent_dir, max_windows=4)
    text += "train:\n  seq_len: 64\n  args: {per_device_train_batch_size: 2}\n"
    text += textwrap.dedent("""\
        sweep:
          method: [shortgpt, wanda]
          ratio: [0.5, 0.75]
          token_budget: [256, 512]
        """)
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    result = invoke("sweep", str(path), "--dry-run", "--hardware", "h100-80gb")
    assert result.exit_code == 0, result.output
    cells = json.loads(result.stdout)["cells"]
    assert len(cells) == 8
    assert reads == [str(tiny_parent_dir)]  # preflight, the plans and 8 cells' descriptions: one read
    for cell in cells:
        assert set(cell["plan"]["stages"]) >= {"parent_eval", "prune", "train_continued", "scratch_eval"}
        assert cell["peaks"]["device_bytes"] > 0 and cell["peaks"]["seconds"] > 0
    assert "peak device" in result.stderr
    assert weights_loaded == []


def test_the_config_cache_sees_a_changed_file_and_hands_out_copies(tmp_path, tiny_parent_dir):
    import shutil

    from hfprune.recipe.schema import ParentSpec

    folder = tmp_path / "parent"
    shutil.copytree(tiny_parent_dir, folder)
    spec = ParentSpec(model=str(folder))
    first = hub.load_parent_config(spec)
    first.num_hidden_layers = 99  # the caller's copy: the cache keeps its own
    assert hub.load_parent_config(spec).num_hidden_layers == 8
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    assert hub.load_parent_config(spec).num_hidden_layers == 4


def test_validate_warns_when_an_evaluation_set_reads_calibration_text(write_recipe):
    overlapping = write_recipe(name="overlap")
    text = overlapping.read_text().replace("split: test}", "split: train}")
    overlapping.write_text(text)
    held_out = write_recipe(name="held_out")
    result = invoke("validate", str(overlapping), str(held_out), "--no-parent")
    assert result.exit_code == 0, result.output  # a warning, not an error: the recipe is valid
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1
    assert "overlap.yaml: eval.perplexity.0.dataset" in warnings[0]
    assert "calibration data" in warnings[0] and "split: test or validation" in warnings[0]
    assert f"ok       {overlapping}" in result.stdout and f"ok       {held_out}" in result.stdout


def test_a_run_logs_the_held_out_warning_and_the_plan_before_any_work(write_recipe, caplog, weights_loaded):
    path = write_recipe()
    path.write_text(path.read_text().replace("split: test}", "split: train}"))
    with caplog.at_level("INFO"):
        result = invoke("run", str(path), "--device-memory", "1GiB")
    assert result.exit_code == 2  # the plan refuses this machine, after warning
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("eval.perplexity.0.dataset: evaluation set 'pydoc'") for m in messages)
    assert any(m.startswith("plan: tiny on accelerator (stated)") for m in messages)


def test_an_evaluation_set_naming_no_split_reads_the_held_out_one(write_recipe):
    path = write_recipe()
    path.write_text(path.read_text().replace(", split: test}", "}"))
    recipe = load_recipe(path)
    assert recipe.eval.perplexity[0].dataset.split == "test"  # pydoc's held-out split, not train
    assert recipe.calibration.dataset.split == "train"  # calibration keeps reading the training split
    named = load_recipe(path, ["eval.perplexity.0.dataset.split=train"])
    assert named.eval.perplexity[0].dataset.split == "train"  # a named split is kept
