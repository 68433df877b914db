"""Sparse pruners (wanda, sparsegpt, magnitude): exact sparsity per comparison group, untouched modules,
weight updates only where the method makes them, N:M rules, Hessian errors, and that the layer-by-layer
walk is really sequential with only one layer's statistics alive."""

from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig

from hfprune.architectures.llama import LLAMA
from hfprune.masks.storage import load_masks, save_masks
from hfprune.pruners import get_method, get_pruner
from hfprune.pruners.options import Pattern
from hfprune.pruners.sparse.ops import (
    HessianError,
    inverse_hessian_factor,
    lowest_in_rows,
    matrix_keep_mask,
    pruned_count,
    sparsegpt_prune,
)
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import load_recipe, validate_recipe


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
BLOCK = 32  # below the tiny in_features (64, 128) so SparseGPT runs several column blocks
CASES = [("wanda", "unstructured", 0.7), ("wanda", "2:4", 0.5), ("sparsegpt", "unstructured", 0.7)]
CASES += [("sparsegpt", "4:8", 0.5), ("magnitude", "unstructured", 0.7), ("magnitude", "2:4", 0.5)]


def make(method: str, **options):
    cls = get_pruner(method)
    if method == "sparsegpt":
        options.setdefault("block_size", BLOCK)
    return cls(cls.Options(**options))


def calibration(vocab: int, samples: int = 4, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(2, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def parent():
    return tiny_model(num_hidden_layers=2)


@pytest.fixture(scope="module")
def ids(parent):
    return calibration(parent.config.vocab_size)


@pytest.fixture(scope="module")
def pruned(parent, ids):
    cache = {}

    def get(method: str, pattern: str, ratio: float):
        if (method, pattern, ratio) not in cache:
            cache[method, pattern, ratio] = make(method, pattern=pattern).prune(
                copy.deepcopy(parent), ids, ratio
            )
        return cache[method, pattern, ratio]

    return get


def pruned_per_group(method: str, pattern: str, ratio: float, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pruned count of every comparison group the method promises to hit exactly, the promised count)."""
    rows, cols = keep.shape
    drop = ~keep
    if pattern != "unstructured":
        m = Pattern.parse(pattern).group
        return drop.reshape(rows, cols // m, m).sum(-1).flatten(), m - Pattern.parse(pattern).keep
    if method == "wanda":
        return drop.sum(dim=1), pruned_count(cols, ratio)
    if method == "sparsegpt":
        return drop.reshape(rows, cols // BLOCK, BLOCK).sum(dim=(0, 2)), pruned_count(rows * BLOCK, ratio)
    return drop.sum().reshape(1), pruned_count(keep.numel(), ratio)


@pytest.mark.parametrize(("method", "pattern", "ratio"), CASES)
def test_exact_sparsity_in_every_group_and_nothing_else_touched(parent, pruned, method, pattern, ratio):
    result = pruned(method, pattern, ratio)
    params = dict(result.model.named_parameters())
    assert len(result.masks) == 7 * parent.config.num_hidden_layers
    for name, keep in result.masks.items():
        counts, expected = pruned_per_group(method, pattern, ratio, keep)
        assert (counts == expected).all(), name
        assert torch.equal(keep, params[name] != 0), f"{name}: zeros and mask disagree"
    for name, tensor in parent.named_parameters():
        if name not in result.masks:
            assert torch.equal(params[name], tensor), f"{name} should be untouched"
    report = result.details["sparsity"]
    assert report["pattern"] == pattern and report["masked_nonzero"] == 0
    assert set(report["modules"]) == {name.removesuffix(".weight") for name in result.masks}
    json.dumps(result.details)  # lands in prune_report.json


def survivors_changed(parent, result) -> bool:
    params = dict(parent.named_parameters())
    return any(
        not torch.equal(params[name][keep], weight[keep])
        for name, weight in result.model.named_parameters()
        if (keep := result.masks.get(name)) is not None
    )


def test_sparsegpt_updates_survivors_and_wanda_magnitude_do_not(parent, pruned):
    assert survivors_changed(parent, pruned("sparsegpt", "unstructured", 0.7))
    assert not survivors_changed(parent, pruned("wanda", "2:4", 0.5))
    assert not survivors_changed(parent, pruned("magnitude", "unstructured", 0.7))


def test_masks_round_trip_and_recreate_the_zeros(parent, pruned, tmp_path):
    result = pruned("sparsegpt", "4:8", 0.5)
    path = save_masks(result.masks, tmp_path / "sparsity_masks.safetensors")
    loaded = load_masks(path)
    assert loaded.keys() == result.masks.keys()
    twin = copy.deepcopy(parent)  # a twin re-applying the saved masks gets exactly the same zeros
    for name, weight in twin.named_parameters():
        if name in loaded:
            assert torch.equal(loaded[name], result.masks[name])
            weight.data.masked_fill_(~loaded[name], 0)
    pruned_params = dict(result.model.named_parameters())
    assert all(torch.equal(w == 0, pruned_params[n] == 0) for n, w in twin.named_parameters() if n in loaded)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_zero_ratio_is_the_identity_even_with_a_pattern(parent, ids, method):
    model = copy.deepcopy(parent)
    result = make(method, pattern="2:4").prune(model, ids, 0.0)
    assert all(keep.all() for keep in result.masks.values())
    assert result.shape.ratio_achieved == 0
    for (name, tensor), weight in zip(parent.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(tensor, weight), name


def test_nm_patterns_need_ratio_one_half(parent, ids):
    pruner = make("wanda", pattern="2:4")
    assert pruner.ratio_problem(0.5) is None
    message = pruner.ratio_problem(0.6)
    assert "2:4" in message and "0.5" in message and "unstructured" in message
    with pytest.raises(ValueError, match=r"needs ratio 0\.5"):
        pruner.prune(copy.deepcopy(parent), ids, 0.6)
    raw = {"name": "x", "parent": {"model": "p"}, "prune": {"method": "wanda", "ratio": 0.6}}
    raw["prune"]["options"] = {"pattern": "4:8"}
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw, "recipe.yaml")
    assert err.value.problems == [("prune.ratio", make("wanda", pattern="4:8").ratio_problem(0.6))]
    assert make("wanda").ratio_problem(0.8) is None  # above 0.5 is unstructured


def test_option_errors_name_the_allowed_values():
    problems = get_method("wanda").options.problems({"pattern": "3:4"})
    assert problems[0][0] == "options.pattern" and "'2:4'" in problems[0][1]
    problems = get_method("sparsegpt").options.problems({"pattern": "4:8", "block_size": 12})
    assert problems and "multiple of 8" in problems[0][1]


def test_non_positive_definite_hessian_gives_a_clear_error():
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1; 1% dampening cannot fix it
    with pytest.raises(HessianError, match="not positive definite after dampening"):
        inverse_hessian_factor(indefinite, 0.01)
    assert torch.isfinite(inverse_hessian_factor(torch.zeros(3, 3), 0.01)).all()  # dead inputs are fine


def test_overflowing_activations_name_the_module(parent, ids):
    model = copy.deepcopy(parent)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(float("inf"))
    with pytest.raises(HessianError, match=r"model\.layers\.0\.mlp\.gate_proj: .*non-finite"):
        make("sparsegpt").prune(model, ids, 0.5)


def test_sparsegpt_update_reconstructs_outputs_better_than_masking_alone():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated features
    weight = torch.randn(48, 64, generator=gen)
    upper = inverse_hessian_factor(inputs.T @ inputs, 0.01)
    updated, keep = sparsegpt_prune(weight, upper, 0.5, Pattern(), block_size=16)
    error = (inputs @ (updated - weight).T).norm()
    assert error < 0.8 * (inputs @ (weight * keep - weight).T).norm()  # same mask, no update
    assert error < 0.8 * (inputs @ (weight * matrix_keep_mask(weight.abs(), 0.5) - weight).T).norm()


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_stacked_sweep_equals_one_matrix_at_a_time(pattern):
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 32, generator=gen)
    upper = inverse_hessian_factor(inputs.T @ inputs, 0.01)
    first, second = torch.randn(24, 32, generator=gen), torch.randn(8, 32, generator=gen)
    stacked, keep = sparsegpt_prune(torch.cat([first, second]), upper, 0.5, pattern, 16, row_splits=[24, 8])
    for rows, weight in ((slice(0, 24), first), (slice(24, 32), second)):
        alone, alone_keep = sparsegpt_prune(weight, upper, 0.5, pattern, 16)
        assert torch.equal(keep[rows], alone_keep)
        torch.testing.assert_close(stacked[rows], alone)


def test_lowest_selection_is_exact_with_ties():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    lowest = lowest_in_rows(scores, 3)
    assert lowest.tolist() == [
        [False, True, True, False, False, True],
        [True, True, True, False, False, False],
    ]
    assert not lowest_in_rows(scores, 0).any() and lowest_in_rows(scores, 6).all()
    flat = matrix_keep_mask(torch.ones(4, 5), 0.5)
    assert int((~flat).sum()) == 10


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_layer_statistics_come_from_pruned_outputs(method):
    parent, ratio = tiny_model(num_hidden_layers=3), 0.5
    ids = calibration(parent.config.vocab_size)
    sequential = make(method).prune(copy.deepcopy(parent), ids, ratio)
    # One-shot statistics of a model whose layer 0 alone is already pruned: layer 1 then sees exactly
    # the inputs the sequential walk gave it. Statistics of the dense parent do not.
    hybrid = copy.deepcopy(parent)
    hybrid.model.layers[0].load_state_dict(sequential.model.model.layers[0].state_dict())
    for source, same in ((hybrid, True), (parent, False)):
        pruner = make(method)
        one_shot = pruner.apply(copy.deepcopy(source), pruner.score(source, ids), ratio)
        layer1 = [n for n in sequential.masks if n.startswith("model.layers.1.")]
        assert all(torch.equal(one_shot.masks[n], sequential.masks[n]) for n in layer1) is same
    assert sequential.details["sequential"] and not one_shot.details["sequential"]


def test_only_one_layer_of_statistics_is_alive(monkeypatch, parent, ids):
    pruner, alive_at_creation, refs = make("sparsegpt"), [], []
    original = type(pruner).new_statistic

    def tracked(self, features, device):
        alive_at_creation.append(sum(ref() is not None for ref in refs))
        statistic = original(self, features, device)
        refs.append(weakref.ref(statistic))
        return statistic

    monkeypatch.setattr(type(pruner), "new_statistic", tracked)
    model = copy.deepcopy(parent)
    pruner.prune(model, ids, 0.5)
    groups = len(LLAMA.linear_groups)
    assert len(alive_at_creation) == groups * parent.config.num_hidden_layers
    assert alive_at_creation[::groups] == [0] * parent.config.num_hidden_layers  # previous layer's are gone
    assert not any(module._forward_hooks for module in model.modules())


def test_magnitude_needs_no_calibration_and_wanda_does(parent):
    assert not get_pruner("magnitude").needs_calibration
    make("magnitude").prune(copy.deepcopy(parent), None, 0.5)
    with pytest.raises(ValueError, match="needs calibration"):
        make("wanda").prune(copy.deepcopy(parent), None, 0.5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_plan_changes_no_config_and_counts_nonzero_parameters(method, pattern):
    llama_8b = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    )  # fmt: skip
    plan = make(method, pattern=pattern).plan(llama_8b, 0.5)
    assert plan.config_changes == {}
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert plan.params_before.non_embedding - plan.params_after.non_embedding == linear // 2
    assert 0.4999 < plan.ratio_achieved < 0.5  # norms stay dense
    tiny = make(method, pattern=pattern).plan(tiny_config(), 0.5)
    assert 0.49 < tiny.ratio_achieved < 0.5


def test_plan_matches_the_pruned_count_at_awkward_ratios(parent, ids):
    for method in ("wanda", "sparsegpt", "magnitude"):
        pruner = make(method)
        result = pruner.prune(copy.deepcopy(parent), ids, 0.29)
        dropped = sum(int((~keep).sum()) for keep in result.masks.values())
        planned = pruner.plan(parent.config, 0.29)
        assert planned.params_before.total - planned.params_after.total == dropped, method
        assert result.shape.params_after == planned.params_after
    assert {name.split(".", 3)[3] for name in result.masks} == {f"{n}.weight" for n in LLAMA.linears}


@pytest.mark.parametrize("name", ["wanda_0.5", "sparsegpt_0.5", "wanda_0.5_2of4", "sparsegpt_0.5_2of4"])
def test_shipped_sparse_recipes_validate_and_say_their_command(name):
    path = RECIPES / f"{name}.yaml"
    recipe = load_recipe(path)
    text = path.read_text()
    header = text[: text.index("\nname:")]  # the comment block that opens the recipe
    assert text.startswith("#") and f"hfprune run recipes/{name}.yaml" in header
    assert recipe.prune.ratio == 0.5 and recipe.parent.dtype == "bfloat16"
    assert (recipe.calibration.num_samples, recipe.calibration.seq_len) == (128, 8192)
    assert recipe.prune.options.get("pattern", "unstructured") == (
        "2:4" if "2of4" in name else "unstructured"
    )
