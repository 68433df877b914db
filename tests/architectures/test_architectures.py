"""The architecture registry, as a table: every pruner on a tiny random parent of every registered family.

Each pruned model saves and loads with plain `AutoModelForCausalLM`, its parameter count from hfprune's
config formula equals `model.num_parameters()`, and where the method is exact a dense forward of the
parent reproduces it (depth: the parent with the removed layers skipped; sparse: the parent with the
pruned weights; FLAP: the parent with the removed heads' o_proj columns zeroed). Families with biases
or per-head norms show that the surgery carries them; unknown families fail with the known ones.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import planned_shape, scratch_twin_of, tiny_family_model
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from hfprune.architectures.registry import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    architecture_of,
    check_supported,
)
from hfprune.errors import RunFailure
from hfprune.hub import load_parent_config
from hfprune.models.structure import count_config_parameters, count_parameters, decoder_layers, updated_config
from hfprune.pruners import METHODS, get_pruner
from hfprune.pruners.base import ShapeError
from hfprune.pruners.options import Granularity
from hfprune.pruners.shapes import ShapeSpace, build_shape
from hfprune.pruners.width import FlapScores
from hfprune.recipe.schema import ParentSpec


FAMILIES = sorted(ARCHITECTURES)
# What makes a family's tiny parent representative (e.g. a head_dim that is not hidden / heads).
FAMILY_OVERRIDES: dict[str, dict] = {"qwen3": {"head_dim": 24}}
TINY_OPTIONS = {"minitron_width": {"alignment": 4}, "flap": {"alignment": 8}}
SURVIVORS_UPDATED = {"sparsegpt"}  # sparse methods that change the weights they keep


def parent(family: str, **overrides):
    return tiny_family_model(family, **{**FAMILY_OVERRIDES.get(family, {}), **overrides})


def make(name: str, **options):
    cls = get_pruner(name)
    return cls(cls.Options(**{**TINY_OPTIONS.get(name, {}), **options}))


def ids(samples: int = 4, seq_len: int = 24) -> torch.Tensor:
    return torch.randint(2, 384, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def logits(model, tokens: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=use_cache).logits


def assert_counts_match(model) -> None:
    """hfprune's formula from the config alone equals what transformers built."""
    assert count_config_parameters(model.config).total == model.num_parameters()
    assert count_config_parameters(model.config) == count_parameters(model)


def test_registry_lists_every_family_and_unknown_ones_fail_with_the_known_list(tmp_path):
    assert {"llama", "qwen2", "mistral", "qwen3"} <= set(FAMILIES)
    for family in FAMILIES:
        assert architecture_of(AutoConfig.for_model(family)).model_type == family
    with pytest.raises(UnsupportedArchitectureError) as err:
        check_supported(GPT2Config())
    assert isinstance(err.value, RunFailure)
    message = str(err.value)
    assert "model_type='gpt2'" in message
    for spec in ARCHITECTURES.values():
        assert f"{spec.model_type} ({spec.causal_lm})" in message
    wrong_head = AutoConfig.for_model("llama", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForSequenceClassification"):
        check_supported(wrong_head)
    # A recipe's parent is refused from its config alone, before any weight is read.
    GPT2Config().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="llama \\(LlamaForCausalLM\\)"):
        load_parent_config(ParentSpec(model=str(tmp_path)))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_config_formula_counts_every_parameter(family):
    spec = ARCHITECTURES[family]
    variants = [{}, {"tie_word_embeddings": True}, *({flag.key: True} for flag in spec.bias_flags)]
    for overrides in variants:
        model = parent(family, **overrides)
        assert_counts_match(model)
        biased = {
            n.removesuffix(".bias") for n, _ in decoder_layers(model)[0].named_parameters() if ".bias" in n
        }
        assert biased == spec.biased_projections(model.config), overrides


def skipped_layers(source, kept: list[int]):
    """The parent with only the layers `kept`, as a dense model (their cache slots keep the parent's
    numbering, so it runs without a cache)."""
    model = copy.deepcopy(source)
    spec = architecture_of(model.config)
    layers = decoder_layers(model)
    spec.set_decoder_layers(model, torch.nn.ModuleList(layers[i] for i in kept))
    model.config.num_hidden_layers = len(kept)
    for key in spec.per_layer_keys:
        setattr(model.config, key, [getattr(model.config, key)[i] for i in kept])
    return model


def with_weights_of(source, pruned, masks: dict[str, torch.Tensor], name: str):
    """The parent with the pruned model's values in the masked weights; nothing else of it may differ."""
    model, params = copy.deepcopy(source), dict(pruned.named_parameters())
    own = dict(model.named_parameters())
    for key, value in own.items():
        if key not in masks:
            assert torch.equal(params[key], value), f"{name} changed {key}, which it does not prune"
    with torch.no_grad():
        for key, keep in masks.items():
            assert not params[key][~keep].any()
            if name not in SURVIVORS_UPDATED:
                assert torch.equal(params[key][keep], own[key][keep])
            own[key].copy_(params[key])
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_pruner_on_every_family(family, name, tmp_path):
    source, tokens = parent(family), ids()
    pruner = make(name)
    planned = pruner.plan(source.config, 0.5)
    result = pruner.prune(copy.deepcopy(source), tokens, 0.5)
    model = result.model
    assert_counts_match(model)
    assert result.shape.ratio_achieved == pytest.approx(planned.ratio_achieved)
    if pruner.granularity is not Granularity.SPARSE:
        assert count_parameters(model) == planned.params_after
    expected = logits(model, tokens)
    assert torch.isfinite(expected).all()
    if pruner.granularity is Granularity.DEPTH:
        dense = skipped_layers(source, result.details["kept_layers"])
        torch.testing.assert_close(logits(dense, tokens, use_cache=False), expected, rtol=0, atol=0)
    if pruner.granularity is Granularity.SPARSE:
        dense = with_weights_of(source, model, result.masks, name)
        torch.testing.assert_close(logits(dense, tokens), expected, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == family and "auto_map" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert_counts_match(reloaded)
    torch.testing.assert_close(logits(reloaded, tokens), expected, rtol=0, atol=0)


def flap_scores(config, drop_group: int) -> FlapScores:
    """Scores that make every layer lose KV group `drop_group` and keep its FFN."""
    gen, layers = torch.Generator().manual_seed(0), config.num_hidden_layers
    groups = torch.ones(layers, config.num_key_value_heads, dtype=torch.float64)
    groups[:, drop_group] = -1
    q_width = config.num_attention_heads * architecture_of(config).head_dim(config)
    return FlapScores(
        groups=groups,
        ffn=torch.rand(layers, config.intermediate_size, generator=gen, dtype=torch.float64),
        attention_mean=torch.randn(layers, q_width, generator=gen, dtype=torch.float64),
        ffn_mean=torch.randn(layers, config.intermediate_size, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_a_kv_group_equals_zeroing_its_heads_in_the_parent(family):
    source = parent(family)
    spec, config = architecture_of(source.config), source.config
    head_dim = spec.head_dim(config)
    ratio = ShapeSpace(config).ratio({"num_attention_heads": 2, "num_key_value_heads": 1})
    result = make("flap", kv_groups_removed=1).apply(copy.deepcopy(source), flap_scores(config, 0), ratio)
    assert result.details["kept_kv_groups"] == [[1]] * config.num_hidden_layers
    assert result.model.config.intermediate_size == config.intermediate_size
    assert spec.head_dim(result.model.config) == head_dim
    emulated = copy.deepcopy(source)
    with torch.no_grad():
        for layer in decoder_layers(emulated):
            layer.get_submodule(spec.o_proj).weight[:, : 2 * head_dim] = 0
    for kept, full in zip(decoder_layers(result.model), decoder_layers(source), strict=True):
        for name in spec.fixed_biases:  # q/k/v biases follow their rows (group 1: the second half)
            bias = full.get_submodule(name).bias
            torch.testing.assert_close(
                kept.get_submodule(name).bias, bias[bias.numel() // 2 :], rtol=0, atol=0
            )
        for name in spec.head_norms:
            assert torch.equal(kept.get_submodule(name).weight, full.get_submodule(name).weight)
    tokens = ids()
    assert not torch.allclose(logits(emulated, tokens), logits(source, tokens), atol=1e-3)
    torch.testing.assert_close(logits(result.model, tokens), logits(emulated, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_minitron_width_keeps_heads_biases_and_head_norms(family):
    source = parent(family)
    spec = architecture_of(source.config)
    result = make("minitron_width").prune(copy.deepcopy(source), ids(), 0.5)
    hidden = result.details["kept_hidden_channels"]
    assert spec.head_dim(result.model.config) == spec.head_dim(source.config)
    assert result.model.config.head_dim == spec.head_dim(source.config)  # written, hidden / heads changed
    for kept, full in zip(decoder_layers(result.model), decoder_layers(source), strict=True):
        for name in (spec.q_proj, spec.k_proj, spec.v_proj):  # every head is kept: only columns go
            linear = full.get_submodule(name)
            torch.testing.assert_close(
                kept.get_submodule(name).weight, linear.weight[:, hidden], rtol=0, atol=0
            )
            if linear.bias is not None:  # output rows are untouched, so is their bias
                assert torch.equal(kept.get_submodule(name).bias, linear.bias)
        for name in spec.head_norms:
            assert torch.equal(kept.get_submodule(name).weight, full.get_submodule(name).weight)
        for name in spec.layer_norms:
            assert torch.equal(kept.get_submodule(name).weight, full.get_submodule(name).weight[hidden])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_bias_compensation_needs_a_bias_the_family_can_express(family, block):
    spec, config = ARCHITECTURES[family], parent(family).config
    if not spec.can_bias_output(block):
        with pytest.raises(
            ShapeError, match=f"needs a bias on {spec.output_projection(block)}.*{spec.config_class}"
        ):
            planned_shape(config, "flap", 0.5, {"alignment": 8, "bias_compensation": block})
        return
    shape = planned_shape(config, "flap", 0.5, {"alignment": 8, "bias_compensation": block})
    new = updated_config(config, shape.config_changes)
    assert spec.output_projection(block) in spec.biased_projections(new)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_follow_the_family_rule_on_a_real_config(family):
    """SmolLM2's shape (9 heads) in each family: only a config class that checks hidden % heads on load
    needs the coarse lcm grid; every resolved shape loads through the family's own config class."""
    spec = ARCHITECTURES[family]
    values = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}
    config = AutoConfig.for_model(family, num_attention_heads=9, num_key_value_heads=3, head_dim=64, **values)
    if spec.hidden_divisible_by_heads:
        with pytest.raises(ShapeError, match="lcm\\(alignment 64, num_attention_heads 9\\) = 576"):
            planned_shape(config, "minitron_width", 0.5)
        return
    for method in ("minitron_width", "flap", "minitron_depth"):
        shape = planned_shape(config, method, 0.5)
        new = updated_config(config, shape.config_changes)
        assert abs(shape.ratio_achieved - 0.5) <= 0.03 and new.hidden_size % 64 == 0
        assert count_config_parameters(new) == shape.params_after
        assert spec.head_dim(new) == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_scratch_twin_has_the_same_shape_and_keeps_every_norm_on_request(family, tmp_path):
    pruned = make("minitron_width").prune(parent(family), ids(), 0.5).model
    twin = scratch_twin_of(pruned, tmp_path / "pruned", seed=0, reinit_embeddings_and_norms=False)
    assert type(twin) is type(pruned) and count_parameters(twin) == count_parameters(pruned)
    spec = architecture_of(pruned.config)
    for source, copied in zip(spec.norm_modules(pruned), spec.norm_modules(twin), strict=True):
        assert torch.equal(source.weight, copied.weight)
    assert not torch.equal(
        decoder_layers(twin)[0].get_submodule(spec.q_proj).weight,
        decoder_layers(pruned)[0].get_submodule(spec.q_proj).weight,
    )


def test_depth_pruning_keeps_per_layer_attention_types_in_step(tmp_path):
    """A Qwen2 parent whose later layers use sliding-window attention: the kept layers keep their types."""
    source = parent("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    types = source.config.layer_types
    assert types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    tokens = ids(seq_len=20)  # longer than the window, so the attention type matters
    result = make("shortgpt").prune(copy.deepcopy(source), tokens, 0.5)
    kept = result.details["kept_layers"]
    assert result.model.config.layer_types == [types[i] for i in kept]
    expected = logits(skipped_layers(source, kept), tokens, use_cache=False)
    torch.testing.assert_close(logits(result.model, tokens), expected, rtol=0, atol=0)
    result.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, tokens), expected, rtol=0, atol=0)


def test_qwen3_head_norms_fix_head_dim_and_its_attention_bias_carries_compensation():
    """Qwen3 writes head_dim (24 here, not hidden / heads = 16); q_norm/k_norm are over it, so a shape
    that changes it is refused, and FLAP's attention compensation lands in o_proj's bias."""
    source = parent("qwen3")
    spec, config = architecture_of(source.config), source.config
    assert spec.head_dim(config) == 24 and decoder_layers(source)[0].self_attn.q_norm.weight.shape == (24,)
    with pytest.raises(ShapeError, match="q_norm, self_attn.k_norm are over head_dim, which must stay 24"):
        build_shape(config, {"head_dim": 16}, 0.1)
    scores = flap_scores(config, drop_group=0)
    pruner = make("flap", kv_groups_removed=1, bias_compensation="attention")
    result = pruner.apply(copy.deepcopy(source), scores, 0.5)
    assert result.model.config.attention_bias is True and result.details["attention_bias"] is True
    assert_counts_match(result.model)
    emulated = copy.deepcopy(source)
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(emulated)):
            o_proj = layer.self_attn.o_proj
            o_proj.bias = torch.nn.Parameter(
                o_proj.weight[:, :48] @ scores.attention_mean[index, :48].float()
            )
            o_proj.weight[:, :48] = 0
            removed = sorted(set(range(128)) - set(result.details["kept_ffn_neurons"][index]))
            layer.mlp.down_proj.weight[:, removed] = 0
    tokens = ids()
    torch.testing.assert_close(logits(result.model, tokens), logits(emulated, tokens), rtol=1e-5, atol=1e-5)
