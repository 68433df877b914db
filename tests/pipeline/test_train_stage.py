"""The train stage through the pipeline: budgets, identical streams, resume, and setup errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from hfprune.pipeline import runner as pipeline
from hfprune.recipe.schema import load_recipe
from hfprune.training import train as training
from hfprune.training.checkpoints import COMPLETE_MARKER
from hfprune.training.train import TrainingSetupError


TRAIN = """
train:
  token_budget: 2000
  seq_len: 32
  args: {per_device_train_batch_size: 4, save_steps: 4, logging_steps: 4, learning_rate: 1.0e-3}
"""
TOKENS_PER_STEP = 4 * 32


def ran(summary) -> list[str]:
    return [o.stage for o in summary.outcomes if o.ran]


def test_both_runs_train_on_the_budget(write_recipe):
    recipe = load_recipe(write_recipe(TRAIN))
    summary = pipeline.run(recipe)
    assert ran(summary)[3:] == ["train_continued", "continued_eval", "train_scratch", "scratch_eval", "card"]
    metrics = summary.metrics
    for run in ("continued", "scratch"):
        tokens = metrics[run]["tokens_trained"]
        assert 2000 <= tokens < 2000 + TOKENS_PER_STEP  # stops at the first step reaching the budget
        report = json.loads((recipe.output_path / "models" / run / "training_report.json").read_text())
        assert report["tokens_trained"] == tokens and report["steps"] == 16
        assert "pydoc" in metrics[run]["perplexity"]
    assert metrics["continued"]["tokens_trained"] == metrics["scratch"]["tokens_trained"]
    continued = AutoModelForCausalLM.from_pretrained(recipe.output_path / "models/continued")
    scratch = AutoModelForCausalLM.from_pretrained(recipe.output_path / "models/scratch")
    assert continued.config.num_hidden_layers == scratch.config.num_hidden_layers == 4
    assert not torch.equal(continued.lm_head.weight, scratch.lm_head.weight)
    assert not (recipe.output_path / "models/continued/training_args.bin").exists()  # pickles are not shipped
    assert not (recipe.output_path / ".hfprune/train").exists() or not any(
        (recipe.output_path / ".hfprune/train").iterdir()
    )  # checkpoints go once their model is published


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            raise KeyboardInterrupt  # as if the process were killed after checkpoint-4 was saved


def test_interrupted_training_resumes_without_losing_or_recounting_tokens(
    write_recipe, tmp_path, monkeypatch
):
    recipe = load_recipe(write_recipe(TRAIN), ["train.runs=[continued]"])
    reference = load_recipe(write_recipe(TRAIN, name="reference"), ["train.runs=[continued]"])
    pipeline.run(reference)

    real_trainer = training.PruneTrainer

    def interrupted(*args, callbacks=(), **kwargs):
        return real_trainer(*args, callbacks=[*callbacks, _Interrupt()], **kwargs)

    monkeypatch.setattr(training, "PruneTrainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe)
    monkeypatch.setattr(training, "PruneTrainer", real_trainer)
    checkpoints = recipe.output_path / ".hfprune/train/continued/checkpoints"
    assert (checkpoints / "checkpoint-4" / COMPLETE_MARKER).is_file()
    assert not (recipe.output_path / "models/continued").exists()
    half_written = checkpoints / "checkpoint-6"  # a save cut short: no marker, unreadable contents
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text("{ truncated")

    summary = pipeline.run(recipe)
    assert ran(summary)[:2] == ["train_continued", "continued_eval"]
    assert not half_written.exists()
    report = json.loads((recipe.output_path / "models/continued/training_report.json").read_text())
    expected = json.loads((reference.output_path / "models/continued/training_report.json").read_text())
    assert report["resumed_from"] == "checkpoint-4"
    assert report["tokens_trained"] == expected["tokens_trained"]
    resumed = AutoModelForCausalLM.from_pretrained(recipe.output_path / "models/continued")
    straight = AutoModelForCausalLM.from_pretrained(reference.output_path / "models/continued")
    torch.testing.assert_close(resumed.lm_head.weight, straight.lm_head.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.token_budget=100", "smaller than one global batch"),
        ("train.seq_len=1024", "exceeds the model's limit of 256"),
        ("train.skip_tokens=100000000", "the training dataset has"),
    ],
)
def test_setup_errors_come_before_training(write_recipe, override, message):
    recipe = load_recipe(write_recipe(TRAIN), [override])
    with pytest.raises(TrainingSetupError, match=message):
        pipeline.run(recipe)
    assert not (recipe.output_path / "models/continued").exists()
    assert not (recipe.output_path / ".hfprune/train/continued/checkpoints").exists()


def test_changed_training_inputs_discard_old_checkpoints(write_recipe):
    recipe = load_recipe(write_recipe(TRAIN), ["train.runs=[scratch]"])
    pipeline.run(recipe)
    summary = pipeline.run(
        load_recipe(write_recipe(TRAIN), ["train.runs=[scratch]", "train.token_budget=1024"])
    )
    assert ran(summary) == ["train_scratch", "scratch_eval", "card"]
    report = json.loads((recipe.output_path / "models/scratch/training_report.json").read_text())
    assert report["resumed_from"] is None and report["tokens_trained"] == 1024


def test_learning_curves_share_the_token_axis(write_recipe):
    recipe = load_recipe(write_recipe(TRAIN), ["eval.every_tokens=512"])
    metrics = pipeline.run(recipe).metrics
    for run in ("continued", "scratch"):
        curve = metrics[run]["curve"]
        assert [p["tokens"] for p in curve] == [0, 512, 1024, 1536, 2048]
        assert all(p["perplexity"] > 1 for p in curve)
    # Before any step the continued model is the pruned one: the first point is the pruned perplexity.
    start = metrics["continued"]["curve"][0]["perplexity"]
    assert start == pytest.approx(metrics["pruned"]["perplexity"]["pydoc"]["value"], rel=1e-4)
    assert metrics["continued"]["curve"][-1]["perplexity"] < start


def test_sparse_run_reports_its_ratio_and_training_keeps_the_masks(write_recipe):
    from safetensors.torch import load_file

    from hfprune.masks.storage import load_masks

    recipe = load_recipe(write_recipe(TRAIN, method="wanda"))
    pipeline.run(recipe)
    pruned = recipe.output_path / "models/pruned"
    report = json.loads((pruned / "prune_report.json").read_text())
    assert abs(report["ratio_achieved"] - 0.5) < 0.01
    assert report["params_after"]["total"] < report["params_before"]["total"]
    masks = load_masks(pruned / "sparsity_masks.safetensors")
    for run in ("continued", "scratch"):
        assert (recipe.output_path / "models" / run / "sparsity_masks.safetensors").is_file()
        weights = load_file(recipe.output_path / "models" / run / "model.safetensors")
        for name, keep in masks.items():
            assert (weights[name][~keep] == 0).all() and (weights[name][keep] != 0).any(), name
