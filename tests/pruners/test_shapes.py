"""The ratio-to-shape resolver on real model shapes (configs only, no weights): every shape it returns
loads as a plain LlamaConfig and lands within 0.03 of the request, or it explains why it cannot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import planned_shape
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import LlamaConfig

from hfprune.pruners.base import ShapeError
from hfprune.pruners.shapes import legal_groups_removed
from hfprune.recipe.schema import load_recipe


RATIOS = (0.5, 0.6, 0.7, 0.8)
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def smollm2() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    )


def llama_8b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    )


def loadable(config: LlamaConfig, changes: dict) -> LlamaConfig:
    """The config a checkpoint of this shape would carry, through the same validation as from_pretrained."""
    return LlamaConfig.from_dict({**config.to_dict(), **changes})


# SmolLM2's 9 heads make hidden sizes multiples of lcm(alignment, 9): alignment 8 gives a 72 grid.
CASES = [
    ("minitron_depth", {}),
    ("minitron_width", {"alignment": 8}),
    ("flap", {}),
    ("flap", {"bias_compensation": "attention"}),
]


@pytest.mark.parametrize(("method", "options"), CASES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_smollm2_shapes_are_legal_and_within_tolerance(method, options, ratio):
    parent = smollm2()
    shape = planned_shape(parent, method, ratio, options)
    assert abs(shape.ratio_achieved - ratio) <= 0.03
    new = loadable(parent, shape.config_changes)
    assert new.hidden_size % new.num_attention_heads == 0
    assert shape.params_after.non_embedding < shape.params_before.non_embedding
    if method == "minitron_width":
        assert new.hidden_size % 72 == 0 and new.intermediate_size % 8 == 0
        assert (new.num_attention_heads, new.num_key_value_heads, new.head_dim) == (9, 3, 64)
        assert shape.config_changes["head_dim"] == 64
        assert 2.667 * 0.8 <= new.intermediate_size / new.hidden_size <= 2.667 * 1.2
    if method == "flap":
        assert new.hidden_size == 576 and new.head_dim == 64 and new.intermediate_size % 64 == 0
        assert new.num_attention_heads == 3 * new.num_key_value_heads < 9
        assert new.attention_bias is (options.get("bias_compensation") == "attention")
        assert new.mlp_bias is False


@pytest.mark.parametrize("ratio", RATIOS)
def test_width_with_default_alignment_explains_why_smollm2_cannot_be_reached(ratio):
    with pytest.raises(ShapeError) as err:
        planned_shape(smollm2(), "minitron_width", ratio)
    message = str(err.value)
    assert "lcm(alignment 64, num_attention_heads 9) = 576" in message
    assert "hidden_size % num_attention_heads == 0" in message
    assert "nearest legal shape is {'hidden_size': 576" in message
    hint = message.split("`alignment: ")[1]  # the finer alignment that works, and what it gives
    finer = int(hint.split("`")[0])
    assert finer in {32, 16, 8} and abs(float(hint.split("reaches ")[1].split(" ")[0]) - ratio) <= 0.03
    assert (
        abs(planned_shape(smollm2(), "minitron_width", ratio, {"alignment": finer}).ratio_achieved - ratio)
        <= 0.03
    )


def test_unreachable_shapes_name_the_nearest_one():
    with pytest.raises(
        ShapeError, match=r"only whole layers.*nearest legal shape is \{'num_hidden_layers': 2\}"
    ):
        planned_shape(
            LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128), "minitron_depth", 0.6
        )
    with pytest.raises(ShapeError, match=r"`kv_groups_removed` fixes it to 2.*nearest legal shape"):
        planned_shape(smollm2(), "flap", 0.8, {"kv_groups_removed": 2, "alignment": 512})
    with pytest.raises(ShapeError, match=r"ratio 0.99 cannot be reached"):
        planned_shape(smollm2(), "flap", 0.99)


def test_legal_group_counts_follow_the_head_divisibility_check():
    assert legal_groups_removed(smollm2()) == [0, 1, 2]
    # Llama-3.1-8B: 4096 hidden is divisible by 32, 16, 8 or 4 query heads, not by 28, 24, 20 or 12.
    assert legal_groups_removed(llama_8b()) == [0, 4, 6, 7]
    with pytest.raises(StrictDataclassClassValidationError, match="not a multiple"):
        loadable(llama_8b(), {"num_attention_heads": 20, "num_key_value_heads": 5})


@pytest.mark.parametrize("ratio", RATIOS)
def test_llama_8b_shapes_use_64_alignment_and_keep_the_proportion(ratio):
    parent = llama_8b()
    width = planned_shape(parent, "minitron_width", ratio)
    new = loadable(parent, width.config_changes)
    assert abs(width.ratio_achieved - ratio) <= 0.03
    assert new.hidden_size % 64 == 0 and new.intermediate_size % 64 == 0
    assert math.isclose(new.intermediate_size / new.hidden_size, 3.5, rel_tol=0.2)
    flap = planned_shape(parent, "flap", ratio, {"bias_compensation": "attention"})
    assert abs(flap.ratio_achieved - ratio) <= 0.03
    assert 8 - loadable(parent, flap.config_changes).num_key_value_heads in {4, 6, 7}
    depth = planned_shape(parent, "minitron_depth", ratio)
    assert depth.config_changes["num_hidden_layers"] == round(32 * (1 - ratio))


def test_ratio_zero_resolves_to_the_parent_shape():
    parent = smollm2()
    for method, options in CASES:
        shape = planned_shape(parent, method, 0.0, options)
        assert shape.ratio_achieved == 0 and shape.params_after == shape.params_before


def test_fixing_the_ffn_proportion_moves_the_shape():
    parent = llama_8b()
    default = planned_shape(parent, "minitron_width", 0.5).config_changes
    fixed = planned_shape(parent, "minitron_width", 0.5, {"ffn_ratio": 3.0, "proportion_slack": 0.05})
    changes = fixed.config_changes
    assert abs(changes["intermediate_size"] / changes["hidden_size"] - 3.0) <= 0.15
    assert changes["hidden_size"] > default["hidden_size"]
    assert abs(fixed.ratio_achieved - 0.5) <= 0.03


@pytest.mark.parametrize("name", ["minitron_depth_0.5", "minitron_width_0.5", "flap_0.5"])
def test_shipped_recipes_resolve_on_llama_8b(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.parent.model == "meta-llama/Llama-3.1-8B"
    shape = planned_shape(llama_8b(), recipe.prune.method, recipe.prune.ratio, recipe.prune.options)
    assert abs(shape.ratio_achieved - 0.5) <= 0.03
    if recipe.prune.method == "flap":
        assert recipe.prune.options["bias_compensation"] == "attention"
        assert shape.config_changes["attention_bias"] is True and shape.config_changes["mlp_bias"] is False
