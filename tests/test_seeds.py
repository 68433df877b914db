"""Seed streams (`hfprune.seeds`): one seed per role, and a random-init twin that is never its parent's start.

With one seed for every role, the twin of a run seeded like its parent was the parent's own initial
weights: the fixture parent (tests/conftest.py) is `torch.manual_seed(0)` then `LlamaForCausalLM`, and a
recipe's seed defaults to 0. The train stage now initialises the twin from `Role.TWIN_INIT`, while the
data order keeps the recipe seed, so runs made before the streams existed read the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_recipe_yaml
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from hfprune.masks.storage import load_masks
from hfprune.models.twin import scratch_twin_from_folder
from hfprune.pipeline import runner as pipeline
from hfprune.pipeline.stages import train as train_stage
from hfprune.pipeline.workspace import Workspace
from hfprune.recipe.schema import load_recipe
from hfprune.seeds import Role, role_seed


# The streams as published: a change here changes every twin (and adapter) a recipe makes.
GOLDEN = {
    0: {
        "DATA_ORDER": 0,
        "PARENT_INIT": 475213806,
        "TWIN_INIT": 1674277915,
        "ADAPTER_INIT": 1976155994,
        "CONTROL_INIT": 3367574,
    },
    42: {
        "DATA_ORDER": 42,
        "PARENT_INIT": 471401222,
        "TWIN_INIT": 208134001,
        "ADAPTER_INIT": 1525583247,
        "CONTROL_INIT": 618525757,
    },
}

TRAIN = """
train:
  runs: [scratch]
  token_budget: 64
  seq_len: 16
  args: {per_device_train_batch_size: 4}
"""


def test_role_seeds_are_stable_distinct_per_role_and_31_bit():
    for seed, expected in GOLDEN.items():
        assert {role.name: role_seed(seed, role) for role in Role} == expected
    for seed in range(64):
        values = [role_seed(seed, role) for role in Role]
        assert len(set(values)) == len(Role)
        assert all(0 <= value < 2**31 for value in values)  # valid for torch.manual_seed and set_seed
    # Each role's stream follows the recipe seed: different recipes, different twins.
    assert len({role_seed(seed, Role.TWIN_INIT) for seed in range(64)}) == 64


def test_the_data_order_keeps_the_recipe_seed():
    for seed in (0, 1, 7, 2**31 - 1):
        assert role_seed(seed, Role.DATA_ORDER) == seed


class _Captured(Exception):
    """Raised by the spy once the train stage has built the twin: no training is needed to test its start."""


@pytest.fixture(scope="module")
def twin_start(tmp_path_factory, tiny_parent_dir):
    """The train stage of a wanda run (the twin keeps the parent's shapes), stopped at `train_model`: the
    seed it was given and the twin's weights as training would start from them."""
    root = tmp_path_factory.mktemp("seeds")
    path = root / "twin.yaml"
    prune = "prune:\n  method: wanda\n  ratio: 0.5\n"
    path.write_text(tiny_recipe_yaml("twin", root / "out", tiny_parent_dir, prune=prune) + TRAIN)
    recipe = load_recipe(path)
    seen = {}

    def capture(model, tokenizer, spec, *, seed, **kwargs):
        seen.update(seed=seed, weights={k: v.detach().clone() for k, v in model.state_dict().items()})
        raise _Captured

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_stage, "train_model", capture)
        with pytest.raises(_Captured):
            pipeline.run(recipe)
    return recipe, seen


def initial_weights(seed: int) -> dict[str, torch.Tensor]:
    """A parent of the fixture's shape as its constructor initialises it from `seed` (the fixture parent
    is this for seed 0, before it scales two projections of each layer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_config()).state_dict()


def agreement(twin: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Per weight matrix: whether the twin's surviving weights (the non-zero ones: the mask zeroes the
    rest) equal the reference's at the same places. Norms are left out: they start at one, whatever
    the seed."""
    return {
        name: torch.equal(value[value != 0], reference[name][value != 0])
        for name, value in twin.items()
        if value.dim() == 2
    }


def test_the_train_stage_reads_data_in_the_recipe_seeds_order(twin_start):
    recipe, seen = twin_start
    assert recipe.seed == 0 and seen["seed"] == role_seed(recipe.seed, Role.DATA_ORDER) == 0


def test_the_twin_starts_from_its_own_stream(twin_start):
    recipe, seen = twin_start
    ws = Workspace(recipe.output_path)
    expected = scratch_twin_from_folder(
        ws.pruned_dir, seed=role_seed(recipe.seed, Role.TWIN_INIT), masks=load_masks(ws.masks_path)
    ).state_dict()
    assert seen["weights"].keys() == expected.keys()
    assert all(torch.equal(seen["weights"][name], expected[name]) for name in expected)


def test_the_twin_differs_from_a_parent_initialised_with_the_recipe_seed(twin_start, tiny_parent_dir):
    recipe, seen = twin_start
    parent_start = initial_weights(recipe.seed)
    saved = load_file(tiny_parent_dir / "model.safetensors")
    # The fixture parent is that start (these weights are saved unscaled).
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert torch.equal(saved[name], parent_start[name])
    # With the recipe seed itself the twin would be the parent's start on every surviving weight ...
    ws = Workspace(recipe.output_path)
    old = scratch_twin_from_folder(ws.pruned_dir, seed=recipe.seed, masks=load_masks(ws.masks_path))
    assert all(agreement(old.state_dict(), parent_start).values())
    # ... while the stage's twin shares no weight matrix with it.
    found = agreement(seen["weights"], parent_start)
    assert len(found) > 50 and not any(found.values())


def test_the_twin_differs_from_a_parent_initialised_from_its_own_stream(twin_start):
    recipe, seen = twin_start
    parent_start = initial_weights(role_seed(recipe.seed, Role.PARENT_INIT))
    found = agreement(seen["weights"], parent_start)
    assert len(found) > 50 and not any(found.values())
