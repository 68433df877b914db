"""A sparse parent (its `sparsity_masks.safetensors` beside the weights) keeps its zeros through pruning
and training (finding 7, first part): loaded with the parent, carried by depth, width and sparse pruning,
saved with the pruned model, and still zero in the trained one."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfprune.hub import load_parent
from hfprune.masks.parent import ParentMasksError
from hfprune.masks.storage import load_masks, masks_from_zeros, save_masks
from hfprune.pipeline import runner as pipeline
from hfprune.pruners import build_pruner
from hfprune.recipe.schema import ParentSpec, load_recipe


SPARSITY = 0.4


@pytest.fixture(scope="module")
def sparse_parent(tmp_path_factory, tiny_parent_dir):
    """The tiny parent with 40% of every projection weight removed at random (not by magnitude, so no
    pruner would remove the same weights by itself), zeroed in the weights and written as masks."""
    path = tmp_path_factory.mktemp("sparse") / "tiny-sparse"
    shutil.copytree(tiny_parent_dir, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(7)
    masks = {}
    with torch.no_grad():
        for name in masks_from_zeros(model):  # the projection weights of every decoder layer
            param = model.get_parameter(name)
            masks[name] = torch.rand(param.shape, generator=generator) >= SPARSITY
            param.mul_(masks[name])
    model.save_pretrained(path)
    save_masks(masks, path / "sparsity_masks.safetensors")
    return path


def loaded(sparse_parent):
    return load_parent(ParentSpec(model=str(sparse_parent), device="cpu"))


def test_the_parent_is_loaded_with_its_masks_and_masked_weights_are_zero(sparse_parent, tiny_parent_dir):
    parent = loaded(sparse_parent)
    assert parent.masks is not None and len(parent.masks) == 8 * 7
    for name, keep in parent.masks.items():
        assert not parent.model.get_parameter(name)[~keep].any(), name
    assert load_parent(ParentSpec(model=str(tiny_parent_dir), device="cpu")).masks is None


def test_a_mask_file_that_is_damaged_or_does_not_fit_the_weights_is_one_clear_failure(
    sparse_parent, tmp_path
):
    other = tmp_path / "other"
    shutil.copytree(sparse_parent, other)
    masks = load_masks(other / "sparsity_masks.safetensors")
    name = next(iter(masks))
    masks[name] = masks[name][:, :-1]
    save_masks(masks, other / "sparsity_masks.safetensors")
    with pytest.raises(ParentMasksError, match=f"do not fit its weights.*{name}"):
        loaded(other)
    (other / "sparsity_masks.safetensors").write_bytes(b"junk")
    with pytest.raises(ParentMasksError, match="cannot read the parent's masks .*remove it"):
        loaded(other)


def test_depth_pruning_and_training_keep_the_parents_zeros(sparse_parent, tmp_path):
    """The finding: a sparse parent pruned by depth and trained had lost its zeros."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: sparse-parent\noutput_dir: {tmp_path / 'out'}\nparent: {{model: {sparse_parent}}}\n"
        "prune: {method: shortgpt, ratio: 0.5}\ncalibration: {num_samples: 4, seq_len: 64}\n"
        "eval: {perplexity: [{name: pydoc, dataset: {path: 'hfprune:pydoc_topics', split: test}, "
        "seq_len: 64, max_windows: 2}]}\n"
        "train: {runs: [continued], token_budget: 512, seq_len: 32, "
        "args: {per_device_train_batch_size: 4, learning_rate: 1.0e-2}}\n"
    )
    recipe = load_recipe(path)
    pipeline.run(recipe)
    out = recipe.output_path
    report = json.loads((out / "models/pruned/prune_report.json").read_text())
    kept = report["kept_layers"]
    assert report["parent_masks"]["carried"].startswith("masks of the kept layers")
    parent_masks = load_masks(sparse_parent / "sparsity_masks.safetensors")
    carried = load_masks(out / "models/pruned/sparsity_masks.safetensors")
    assert len(carried) == len(kept) * 7
    for new, old in enumerate(kept):
        name = "model.layers.{}.mlp.up_proj.weight"
        assert torch.equal(carried[name.format(new)], parent_masks[name.format(old)])
    trained = AutoModelForCausalLM.from_pretrained(out / "models/continued")
    pruned = AutoModelForCausalLM.from_pretrained(out / "models/pruned")
    changed = 0
    for name, keep in carried.items():
        weight = trained.get_parameter(name)
        assert not weight[~keep].any(), f"{name}: the parent's zeros were filled in by training"
        changed += int((weight != pruned.get_parameter(name)).sum())
    assert changed  # training did move the weights it keeps
    # A structural ratio counts layers, not the parent's zeros.
    assert report["ratio_achieved"] == pytest.approx(0.5, abs=0.01)


def test_width_pruning_slices_the_masks_with_the_kept_channels(sparse_parent):
    parent = loaded(sparse_parent)
    recipe = _recipe(sparse_parent, "minitron_width", 0.25, alignment=8)
    result = _prune(recipe, parent)
    hidden = result.details["kept_hidden_channels"]
    for layer, neurons in enumerate(result.details["kept_ffn_neurons"]):
        up = f"model.layers.{layer}.mlp.up_proj.weight"
        down = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(result.masks[up], parent.masks[up][neurons][:, hidden])
        assert torch.equal(result.masks[down], parent.masks[down][hidden][:, neurons])
    assert "sliced with the kept channels" in result.details["parent_masks"]["carried"]


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_sparse_pruning_keeps_every_weight_the_parent_removed(sparse_parent, method, caplog):
    parent = loaded(sparse_parent)
    parent_masks = dict(parent.masks)
    recipe = _recipe(sparse_parent, method, 0.5)
    with caplog.at_level(logging.INFO, logger="hfprune.masks.parent"):
        result = _prune(recipe, parent)
    for name, keep in parent_masks.items():
        assert not (result.masks[name] & ~keep).any(), name  # removed by the parent: removed now
        assert not result.model.get_parameter(name)[~result.masks[name]].any(), name  # and zero
    # The parent's zeros count toward the 50% target: it is reached, not 40% + 50% of the rest.
    removed = sum(int((~m).sum()) for m in result.masks.values()) / sum(
        m.numel() for m in result.masks.values()
    )
    assert removed == pytest.approx(0.5, abs=0.05)
    assert "combined with the pruner's" in result.details["parent_masks"]["carried"]


def test_a_parent_sparser_than_the_target_stays_as_sparse_and_says_so(sparse_parent, caplog):
    parent = loaded(sparse_parent)
    with caplog.at_level(logging.WARNING, logger="hfprune.masks.parent"):
        result = _prune(_recipe(sparse_parent, "magnitude", 0.2), parent)
    assert any("sparser than requested" in r.getMessage() for r in caplog.records)
    removed = sum(int((~m).sum()) for m in result.masks.values()) / sum(
        m.numel() for m in result.masks.values()
    )
    assert removed == pytest.approx(SPARSITY, abs=0.02)


def _recipe(parent, method, ratio, **options):
    from hfprune.recipe.schema import Recipe

    return Recipe.model_validate(
        {
            "name": "unit",
            "parent": {"model": str(parent), "device": "cpu"},
            "prune": {"method": method, "ratio": ratio, "options": options},
            "calibration": {"num_samples": 4, "seq_len": 32},
        }
    )


def _prune(recipe, parent):
    from hfprune.pipeline.runner import context_for
    from hfprune.pipeline.stages.prune import prune_model

    ctx = context_for(recipe)
    assert isinstance(ctx.pruner, type(build_pruner(recipe.prune.method, recipe.prune.options)))
    return prune_model(ctx, parent)
