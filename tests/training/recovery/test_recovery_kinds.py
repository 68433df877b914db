"""The recovery kinds through the pipeline on the tiny parent: `distilled` (the pruned weights trained
against the parent's logits) and `lora` (adapters trained, merged into a plain checkpoint) beside
`continued` and `scratch`, on the same tokens, with sparse masks kept, reruns skipped and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from hfprune import kinds
from hfprune.masks.storage import load_masks
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import load_recipe
from hfprune.training import train as training
from hfprune.training.checkpoints import COMPLETE_MARKER


TRAIN = """
train:
  runs: [continued, distilled, lora, scratch]
  token_budget: 512
  seq_len: 32
  distill: {alpha: 0.5, temperature: 2.0}
  lora: {rank: 4, alpha: 8}
  args: {per_device_train_batch_size: 4, save_steps: 2, learning_rate: 1.0e-3}
"""


def ran(summary) -> list[str]:
    return [o.stage for o in summary.outcomes if o.ran]


def tokens(folder) -> int:
    return json.loads((folder / "training_report.json").read_text())["tokens_trained"]


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory, tiny_parent_dir):
    """One wanda run with every recovery kind, shared by the tests that only read it."""
    from tests.conftest import tiny_recipe_yaml

    root = tmp_path_factory.mktemp("recovery")
    prune = "prune:\n  method: wanda\n  ratio: 0.5\n"
    path = root / "sparse.yaml"
    path.write_text(tiny_recipe_yaml("sparse", root / "out", tiny_parent_dir, prune=prune) + TRAIN)
    recipe = load_recipe(path)
    return recipe, pipeline.run(recipe)


def test_the_registry_knows_how_each_kind_recovers():
    assert kinds.get("distilled").recovery is kinds.Recovery.DISTILL
    assert kinds.get("lora").recovery is kinds.Recovery.LORA
    assert kinds.get("scratch_distilled").making is kinds.Making.FROM_TWIN
    assert kinds.get("continued").recovery is None
    assert kinds.default_runs() == ["continued", "scratch"]  # recovery kinds only when asked
    assert [k.name for k in kinds.comparison()] == ["continued", "scratch"]


def test_a_recovery_run_without_settings_gets_the_defaults_in_its_resolved_recipe(write_recipe):
    recipe = load_recipe(write_recipe("train: {token_budget: 256, runs: [lora, scratch_distilled]}\n"))
    assert recipe.train.lora.rank == 16 and recipe.train.distill.divergence == "forward_kl"
    assert (
        "distill:" in recipe.to_yaml()
        and load_recipe(write_recipe("train: {token_budget: 256}\n")).train.lora is None
    )
    with pytest.raises(RecipeError, match="train.lora.rank"):
        load_recipe(write_recipe("train: {token_budget: 256, runs: [lora], lora: {rank: 0}}\n"))


def test_every_kind_trains_on_the_same_tokens_and_is_evaluated(sparse_run):
    recipe, summary = sparse_run
    assert ran(summary)[3:] == [
        "train_continued", "continued_eval", "train_distilled", "distilled_eval",
        "train_lora", "lora_eval", "train_scratch", "scratch_eval", "card",
    ]  # fmt: skip
    models = recipe.output_path / "models"
    counts = {kind: tokens(models / kind) for kind in ("continued", "distilled", "lora", "scratch")}
    assert len(set(counts.values())) == 1 and counts["continued"] >= 512, counts
    metrics = summary.metrics
    for kind in ("distilled", "lora"):
        assert metrics[kind]["tokens_trained"] == metrics["continued"]["tokens_trained"]
        assert "pydoc" in metrics[kind]["perplexity"]
    assert metrics["distilled"]["recovery"] == {
        "kind": "distill", "alpha": 0.5, "temperature": 2.0, "divergence": "forward_kl", "beta": 0.5,
    }  # fmt: skip
    assert metrics["lora"]["recovery"]["rank"] == 4 and "recovery" not in metrics["continued"]


def test_the_lora_model_is_a_plain_checkpoint_that_differs_from_the_pruned_one(sparse_run):
    recipe, _ = sparse_run
    folder = recipe.output_path / "models/lora"
    names = {p.name for p in folder.iterdir()}
    assert not any("adapter" in name for name in names), names
    state = load_file(folder / "model.safetensors")
    assert not any("lora_" in key or "base_layer" in key for key in state)
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no peft
    pruned = AutoModelForCausalLM.from_pretrained(recipe.output_path / "models/pruned")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not torch.equal(
        model.model.layers[0].mlp.down_proj.weight, pruned.model.layers[0].mlp.down_proj.weight
    )
    # Only the adapted projections changed: LoRA leaves embeddings and norms as pruned.
    torch.testing.assert_close(model.lm_head.weight, pruned.lm_head.weight, rtol=0, atol=0)


def test_sparse_masks_hold_exactly_in_the_recovered_models(sparse_run):
    recipe, _ = sparse_run
    models = recipe.output_path / "models"
    masks = load_masks(models / "pruned/sparsity_masks.safetensors")
    for kind in ("distilled", "lora"):
        weights = load_file(models / kind / "model.safetensors")
        assert (models / kind / "sparsity_masks.safetensors").is_file()
        for name, keep in masks.items():
            assert (weights[name][~keep] == 0).all(), (kind, name)
            assert (weights[name][keep] != 0).any(), (kind, name)


def test_a_rerun_skips_the_recovered_models_and_cards_describe_them(sparse_run):
    recipe, _ = sparse_run
    assert not any(o.ran for o in pipeline.run(recipe).outcomes)
    distilled = (recipe.output_path / "models/distilled/README.md").read_text()
    lora = (recipe.output_path / "models/lora/README.md").read_text()
    assert "forward_kl" in distilled and "temperature 2.0" in distilled and "alpha 0.5" in distilled
    assert "rank 4" in lora and "down_proj" in lora and "merged" in lora


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt  # as if the process were killed after checkpoint-2 was saved


@pytest.mark.parametrize("kind", ["distilled", "lora"])
def test_an_interrupted_recovery_run_resumes_from_its_checkpoint(write_recipe, monkeypatch, kind):
    overrides = [f"train.runs=[{kind}]", "train.token_budget=512"]
    recipe = load_recipe(write_recipe(TRAIN), overrides)
    reference = load_recipe(write_recipe(TRAIN, name="reference"), overrides)
    pipeline.run(reference)
    real_trainer = training.PruneTrainer

    def interrupted(*args, callbacks=(), **kwargs):
        return real_trainer(*args, callbacks=[*callbacks, _Interrupt()], **kwargs)

    monkeypatch.setattr(training, "PruneTrainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe)
    monkeypatch.setattr(training, "PruneTrainer", real_trainer)
    checkpoint = recipe.output_path / f".hfprune/train/{kind}/checkpoints/checkpoint-2"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    if kind == "lora":
        assert (checkpoint / "adapter_model.safetensors").is_file()  # the checkpoint holds the adapters

    summary = pipeline.run(recipe)
    assert ran(summary)[:2] == [f"train_{kind}", f"{kind}_eval"]
    folder, straight = recipe.output_path / "models" / kind, reference.output_path / "models" / kind
    report = json.loads((folder / "training_report.json").read_text())
    assert report["resumed_from"] == "checkpoint-2" and tokens(folder) == tokens(straight)
    resumed = load_file(folder / "model.safetensors")
    expected = load_file(straight / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_the_random_init_twin_can_be_distilled_from_the_parent(write_recipe):
    """`scratch_distilled`: the control "random init distilled from the parent", same tokens as scratch."""
    recipe = load_recipe(
        write_recipe(TRAIN), ["train.runs=[scratch,scratch_distilled]", "train.token_budget=256"]
    )
    summary = pipeline.run(recipe)
    models = recipe.output_path / "models"
    assert tokens(models / "scratch_distilled") == tokens(models / "scratch") >= 256
    assert summary.metrics["scratch_distilled"]["recovery"]["kind"] == "distill"
    scratch = load_file(models / "scratch/model.safetensors")
    distilled = load_file(models / "scratch_distilled/model.safetensors")
    assert not torch.equal(scratch["lm_head.weight"], distilled["lm_head.weight"])  # a different loss
    card = (models / "scratch_distilled/README.md").read_text()
    assert (
        "random-init baseline distilled from the parent" in card and "base_model" not in card.split("---")[1]
    )
