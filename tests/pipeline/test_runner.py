"""The pipeline on a tiny local parent: the output contract, skip-on-rerun, invalidation, atomic failure."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import tiny_config

from hfprune.architectures.registry import UnsupportedArchitectureError
from hfprune.failures import OutputError
from hfprune.hub import ParentLoadError
from hfprune.pipeline import providers
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.schema import load_recipe


def ran(summary) -> list[str]:
    return [o.stage for o in summary.outcomes if o.ran]


@pytest.fixture
def finished(write_recipe):
    path = write_recipe()
    recipe = load_recipe(path)
    summary = pipeline.run(recipe)
    return path, recipe, summary


def test_run_writes_the_output_contract(finished):
    _, recipe, summary = finished
    out = recipe.output_path
    assert ran(summary) == ["parent_eval", "prune", "pruned_eval", "card"]
    pruned = out / "models" / "pruned"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "prune_report.json"):
        assert (pruned / name).is_file(), name
    assert yaml.safe_load((out / "recipe.yaml").read_text())["prune"] == {
        "method": "shortgpt",
        "ratio": 0.5,
        "options": {},
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"parent", "pruned"}
    ppl = metrics["pruned"]["perplexity"]["pydoc"]
    assert ppl["value"] > 1 and ppl["protocol"]["windows"] == 8 and ppl["protocol"]["bos"] is True
    report = json.loads((pruned / "prune_report.json").read_text())
    assert report["method"] == "shortgpt" and len(report["kept_layers"]) == 4
    assert report["params_after"]["non_embedding"] < report["params_before"]["non_embedding"]
    assert abs(report["ratio_achieved"] - 0.5) < 0.01
    card = (pruned / "README.md").read_text()
    assert card.startswith("---\n") and "shortgpt" in card and "hfprune run" in card
    assert f"{ppl['value']:.2f}" in card  # the card shows the scores


def test_pruned_checkpoint_loads_without_hfprune(finished):
    _, recipe, _ = finished
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(recipe.output_path / "models" / "pruned")!r})
        assert "hfprune" not in sys.modules
        assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
        print(model(torch.tensor([[0, 5, 6, 7]])).logits.shape)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 4, 384])" in done.stdout


def test_rerun_with_nothing_changed_skips_every_stage(finished, monkeypatch):
    _, recipe, _ = finished

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a rerun with unchanged inputs must not load the parent")

    monkeypatch.setattr(providers, "load_parent", no_loading)
    assert ran(pipeline.run(recipe)) == []


def test_changed_ratio_redoes_pruning_and_what_follows(finished, write_recipe):
    path, _, _ = finished
    summary = pipeline.run(load_recipe(path, ["prune.ratio=0.75"]))
    assert ran(summary) == ["prune", "pruned_eval", "card"]
    report = json.loads((summary.output_dir / "models/pruned/prune_report.json").read_text())
    assert len(report["kept_layers"]) == 2


def test_changed_evaluation_keeps_the_pruned_checkpoint(finished):
    path, _, _ = finished
    summary = pipeline.run(load_recipe(path, ["eval.perplexity.0.max_windows=4"]))
    assert ran(summary) == ["parent_eval", "pruned_eval", "card"]


def test_force_reruns_everything(finished):
    _, recipe, _ = finished
    assert ran(pipeline.run(recipe, force=True)) == ["parent_eval", "prune", "pruned_eval", "card"]


def test_stop_after_prune(write_recipe):
    recipe = load_recipe(write_recipe())
    summary = pipeline.run(recipe, stop_after="prune")
    assert ran(summary) == ["prune", "card"]
    assert not (recipe.output_path / "metrics.json").exists()
    assert (recipe.output_path / "models/pruned/README.md").is_file()


def test_full_disk_leaves_no_partial_checkpoint(write_recipe, monkeypatch):
    recipe = load_recipe(write_recipe())

    def full_disk(self, *_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full_disk)
    with pytest.raises(OutputError, match="no space left on device"):
        pipeline.run(recipe)
    models = recipe.output_path / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_missing_parent_creates_nothing(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(), [f"parent.model={tmp_path / 'nowhere'}"])
    with pytest.raises(ParentLoadError, match="does not exist"):
        pipeline.run(recipe)
    assert not recipe.output_path.exists()


def test_non_llama_parent_is_rejected_by_name(write_recipe, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    recipe = load_recipe(write_recipe(), [f"parent.model={gpt2}"])
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        pipeline.run(recipe)
    assert not recipe.output_path.exists()


def test_dry_run_plan_reads_only_the_config(write_recipe, monkeypatch):
    recipe = load_recipe(write_recipe())
    monkeypatch.setattr(providers, "load_parent", lambda *_: pytest.fail("dry run loaded weights"))
    plan = pipeline.describe_plan(recipe)
    assert plan["target_shape"] == {"num_hidden_layers": 4}
    assert plan["parent_shape"]["num_hidden_layers"] == tiny_config().num_hidden_layers
    assert set(plan["stages"].values()) == {"will run"}
    assert plan["params"]["pruned"]["total"] < plan["params"]["parent"]["total"]
    assert not recipe.output_path.exists()
