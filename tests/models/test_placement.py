"""Placement: `parent.device` resolution without hardware, whole and offloaded placement on the host, a
meta-device parent of Llama-3.1-8B's shape, and pruning that decides the same wherever the layers live."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from hfprune.errors import InvalidInput
from hfprune.models import placement
from hfprune.models.placement import (
    DeviceError,
    PlacementError,
    describe,
    fits,
    onloaded,
    place,
    remove_offload,
    resolve_device,
    weight_bytes,
)
from hfprune.pruners import get_pruner
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import validate_recipe


CPU = torch.device("cpu")  # the device offloaded layers are brought to; a different object from HOST


def ids(samples: int = 4, seq_len: int = 24) -> torch.Tensor:
    return torch.randint(2, 384, (samples, seq_len), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def cuda(monkeypatch):
    """Pretend this machine has `count` CUDA devices (resolution only: nothing is allocated)."""

    def have(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return have


# -- resolve_device ----------------------------------------------------------------------------------
def test_auto_is_the_accelerator_when_there_is_one(cuda, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cuda(0)
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU
    cuda(2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun each rank computes on its own GPU
    assert resolve_device("auto") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device(
        "cuda", 1
    )
    assert resolve_device(0) == torch.device("cuda", 0) and resolve_device("cuda:1") == torch.device(
        "cuda", 1
    )
    assert resolve_device("meta") == torch.device("meta")


@pytest.mark.parametrize(
    ("spec", "devices", "message"),
    [
        ("cuda", 0, "asks for CUDA, but this machine has none; use auto or cpu"),
        (1, 0, "asks for CUDA, but this machine has none"),
        ("cuda:3", 2, "has 2 CUDA device(s), indices 0 to 1"),
        ("gpu", 2, "must be auto, cpu, cuda, cuda:N or a device index N, got 'gpu'"),
        (-1, 2, "a device index must be 0 or more"),
    ],
)
def test_a_device_this_machine_lacks_is_an_invalid_input(cuda, spec, devices, message):
    cuda(devices)
    with pytest.raises(DeviceError) as err:
        resolve_device(spec)
    assert isinstance(err.value, InvalidInput) and err.value.exit_code == 2
    assert message in str(err.value) and "parent.device" in str(err.value)


def test_the_recipe_schema_checks_parent_device():
    raw = {"name": "x", "parent": {"model": "p"}, "prune": {"method": "shortgpt", "ratio": 0.5}}
    for good in ("auto", "cpu", "cuda", "cuda:1", 0, 3):
        assert (
            validate_recipe({**raw, "parent": {"model": "p", "device": good}}, "r.yaml").parent.device == good
        )
    assert validate_recipe(raw, "r.yaml").parent.device == "auto"
    with pytest.raises(RecipeError) as err:
        validate_recipe({**raw, "parent": {"model": "p", "device": "tpu"}}, "r.yaml")
    assert [key for key, _ in err.value.problems] == ["parent.device"]


# -- deciding and placing ---------------------------------------------------------------------------------
def test_weights_fit_only_beside_the_headroom():
    gib = 2**30
    assert fits(10 * gib, None)  # the host: nothing measured, always whole
    assert fits(70 * gib, 80 * gib) and not fits(75 * gib, 80 * gib)  # 10% of free is kept
    assert fits(10 * gib, 12 * gib) and not fits(11 * gib, 12 * gib)  # at least 2 GiB is kept


def test_an_8b_parent_on_meta_is_measured_without_memory_and_refused_elsewhere(caplog):
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    size = weight_bytes(model)
    assert size == 2 * 8_030_261_248 + 256  # 8.03B parameters and two rotary tables of 64 values, in bf16
    gib = 2**30
    assert fits(size, 79 * gib) and not fits(size, 16 * gib)  # an 80 GB card holds it; a 16 GB one does not
    with caplog.at_level(logging.INFO, logger="hfprune.models.placement"):
        assert not place(model, torch.device("meta"), stage="parent").offloaded
    assert "parent: on meta in bfloat16 (14.96 GiB of weights)" in caplog.text
    with pytest.raises(PlacementError, match="meta device .never loaded.*cannot be placed on cpu"):
        place(model, CPU, stage="parent")


def test_whole_placement_logs_device_and_dtype(caplog):
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="hfprune.models.placement"):
        result = place(model, CPU, stage="pruned model")
    assert result.to_dict() == {
        "device": "cpu", "dtype": "float32", "offloaded_layers": False, "weight_bytes": weight_bytes(model),
    }  # fmt: skip
    assert "pruned model: on cpu in float32" in caplog.text and describe(model) == "cpu, float32"


@pytest.fixture
def moves(monkeypatch):
    """Every move of an offloaded layer, as (layer index, 'on' | 'home'). Here the device and the home
    are both the host, so the move is told apart by which of the two device objects it is given."""
    recorded: list[tuple[int, str]] = []
    original = placement.move

    def spy(module, device):
        kind = "home" if device is placement.HOST else "on"
        recorded.append((module.self_attn.layer_idx, kind))
        original(module, device)

    monkeypatch.setattr(placement, "move", spy)
    return recorded


def test_offloaded_layers_are_brought_on_one_at_a_time_and_give_the_same_logits(moves):
    parent, batch = tiny_model(num_hidden_layers=3), ids(2)
    model = copy.deepcopy(parent)
    offloaded = place(model, CPU, stage="parent", free=0)  # pretend the device is full
    assert offloaded.offloaded and describe(model) == "cpu, float32, decoder layers offloaded to cpu"
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, parent(batch).logits, rtol=0, atol=0)
    assert moves == [(0, "on"), (0, "home"), (1, "on"), (1, "home"), (2, "on"), (2, "home")]
    moves.clear()
    with onloaded(model.model.layers[1]), torch.no_grad():
        model(batch)
    assert moves == [(1, "on"), (0, "on"), (0, "home"), (2, "on"), (2, "home"), (1, "home")]  # 1 pinned
    remove_offload(model)
    assert describe(model) == "cpu, float32"
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    moves.clear()
    with torch.no_grad():
        model(batch)
    assert moves == []  # no hook left to bring a layer on
    place(model, CPU, free=0)
    assert place(model, CPU).offloaded is False and describe(model) == "cpu, float32"


@pytest.mark.parametrize("method", ["shortgpt", "minitron_depth", "flap", "wanda", "sparsegpt"])
def test_pruning_an_offloaded_parent_decides_as_pruning_a_whole_one(method):
    parent, batch = tiny_model(num_hidden_layers=4), ids()
    options = {"alignment": 8} if method == "flap" else {}
    pruner = get_pruner(method)
    whole = pruner(pruner.Options(**options)).prune(copy.deepcopy(parent), batch, 0.5)
    model = copy.deepcopy(parent)
    place(model, CPU, stage="parent", free=0)
    offloaded = pruner(pruner.Options(**options)).prune(model, batch, 0.5)
    for key in ("kept_layers", "scores", "block_perplexity", "kept_kv_groups", "kept_ffn_neurons"):
        assert whole.details.get(key) == offloaded.details.get(key)
    for name, keep in (whole.masks or {}).items():
        assert torch.equal(keep, offloaded.masks[name])
    with torch.no_grad():
        torch.testing.assert_close(offloaded.model(batch).logits, whole.model(batch).logits, rtol=0, atol=0)


def test_an_8b_shaped_parent_is_pruned_on_meta_to_the_planned_shape():
    """The surgery at full scale without memory: width and depth pruning of a meta-device 8B parent."""
    from hfprune.models.structure import count_parameters
    from hfprune.pruners.width import WidthScores

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    place(model, torch.device("meta"), stage="parent")
    gen = torch.Generator().manual_seed(0)
    scores = WidthScores(hidden=torch.rand(4096, generator=gen), ffn=torch.rand(32, 14336, generator=gen))
    result = get_pruner("minitron_width")().apply(model, scores, 0.5)
    assert count_parameters(result.model) == result.shape.params_after
    assert all(p.is_meta for p in result.model.parameters())
    assert result.model.model.layers[0].mlp.down_proj.weight.shape == (
        result.model.config.hidden_size,
        result.model.config.intermediate_size,
    )


def test_a_deep_copy_of_an_offloaded_model_carries_its_own_hooks(moves):
    """A distillation teacher cast to the training dtype is a deep copy of a possibly offloaded parent."""
    model, batch = tiny_model(num_hidden_layers=2), ids(2)
    place(model, CPU, stage="parent", free=0)
    twin = copy.deepcopy(model)
    remove_offload(model)
    assert describe(model) == "cpu, float32"
    assert describe(twin) == "cpu, float32, decoder layers offloaded to cpu"
    with torch.no_grad():
        twin(batch)
    # The copy's device objects are copies too, so the spy cannot tell its "on" from "home" by identity.
    assert [layer for layer, _ in moves] == [0, 0, 1, 1]
    moves.clear()
    remove_offload(twin)
    with torch.no_grad():
        twin(batch)
    assert moves == []
