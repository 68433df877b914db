"""hfprune.masks.storage: the bit-packed mask file round-trips exactly, stays compact, reads with numpy, rejects
foreign files; masks from zeros and the sparsity report say what the weights hold; packed masks load by
name and by FSDP2 shard without unpacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file

from hfprune.masks.packed import PackedMask, int8_keep_bits, pack_bits, shard_rows, unpack_bits
from hfprune.masks.storage import (
    load_masks,
    load_packed_masks,
    mask_pattern,
    masks_from_zeros,
    save_masks,
    sparsity_report,
)


def random_masks() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (64, 128), "odd.weight": (7, 13), "vector": (5,), "cube": (3, 4, 5), "one": (1, 1)}
    return {name: torch.rand(shape, generator=gen) > 0.5 for name, shape in shapes.items()}


def test_masks_round_trip_exactly(tmp_path):
    masks = random_masks()
    masks["all_dropped"] = torch.zeros(9, 3, dtype=torch.bool)
    loaded = load_masks(save_masks(masks, tmp_path / "m.safetensors"))
    assert loaded.keys() == masks.keys()
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and loaded[name].shape == mask.shape, name
        assert torch.equal(loaded[name], mask), name


def test_file_holds_one_bit_per_weight(tmp_path):
    masks = {f"layer{i}.weight": torch.rand(256, 512) > 0.5 for i in range(4)}
    path = save_masks(masks, tmp_path / "m.safetensors")
    bits = sum(mask.numel() for mask in masks.values())
    assert path.stat().st_size < bits / 8 + 4096  # payload plus a small header


def test_packing_matches_numpy_packbits():
    mask = torch.rand(3, 11) > 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1)))
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_bad_input_and_foreign_files_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="bool tensor"):
        save_masks({"w": torch.ones(2, 2)}, tmp_path / "m.safetensors")
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a sparsity-mask file"):
        load_masks(tmp_path / "model.safetensors")


def test_masks_from_zeros_cover_the_decoder_linears_only():
    model = tiny_model(num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:, ::2] = 0
    masks = masks_from_zeros(model)
    assert len(masks) == 14 and "lm_head.weight" not in masks
    up = masks["model.layers.1.mlp.up_proj.weight"]
    assert not up[:, ::2].any() and up[:, 1::2].all()
    assert masks["model.layers.0.mlp.up_proj.weight"].all()
    only = masks_from_zeros(model, ["lm_head.weight"])
    assert list(only) == ["lm_head.weight"] and only["lm_head.weight"].all()
    with pytest.raises(KeyError, match="no parameter named"):
        masks_from_zeros(model, ["model.layers.9.mlp.up_proj.weight"])


def test_mask_pattern_names_the_tightest_pattern():
    two_four = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    four_eight = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)  # 3 of the first 4 kept
    assert mask_pattern(two_four) == "2:4"
    assert mask_pattern(four_eight) == "4:8"
    assert mask_pattern(torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)) == "unstructured"
    assert mask_pattern(torch.ones(4, 8, dtype=torch.bool)) == "dense"


def test_sparsity_report_per_module_and_escaped_weights():
    model = tiny_model(num_hidden_layers=1)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    masks = {name: torch.ones_like(param, dtype=torch.bool) for name, param in model.named_parameters()}
    masks = {name: masks[name] for name in names}
    masks[names[0]][:, 1::2] = False  # keeps 1 of every 2: a 2:4 mask, 50%
    masks[names[1]][:, :32] = False  # 32 of 128 columns dropped: unstructured, 25%
    report = sparsity_report(model, masks)
    q, down = (report["modules"][name.removesuffix(".weight")] for name in names)
    assert q == {"sparsity": 0.5, "pattern": "2:4"} and down == {"sparsity": 0.25, "pattern": "unstructured"}
    assert report["pattern"] == "mixed"
    assert report["pruned_weights"] == 64 * 32 + 64 * 32
    assert report["sparsity"] == pytest.approx(report["pruned_weights"] / report["masked_weights_total"])
    assert report["masked_nonzero"] == report["pruned_weights"]  # nothing zeroed yet
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks:
                param.masked_fill_(~masks[name], 0)
    assert sparsity_report(model, masks)["masked_nonzero"] == 0


def test_packed_masks_load_by_name_and_unpack_exactly(tmp_path):
    masks = random_masks()
    path = save_masks(masks, tmp_path / "m.safetensors")
    packed = load_packed_masks(path)
    assert packed.keys() == masks.keys()
    for name, mask in masks.items():
        assert isinstance(packed[name], PackedMask) and packed[name].whole
        assert packed[name].nbytes == -(-mask.numel() // 8)  # still one bit per weight in memory
        assert torch.equal(packed[name].unpack(), mask), name
        assert torch.equal(PackedMask.of(mask).unpack(), mask), name
    some = load_packed_masks(path, ["odd.weight", "cube"])
    assert list(some) == ["odd.weight", "cube"]
    assert list(load_masks(path, ["vector"])) == ["vector"]
    with pytest.raises(KeyError, match="no mask for 'nope'"):
        load_packed_masks(path, ["vector", "nope"])


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_a_shard_holds_exactly_the_rows_fsdp2_gives_that_process(tmp_path, world):
    masks = random_masks()
    path = save_masks(masks, tmp_path / "m.safetensors")
    for name, mask in masks.items():
        chunks = torch.chunk(mask, world)  # FSDP2 splits dim 0 like torch.chunk; later shards may be empty
        for rank in range(world):
            part = load_packed_masks(path, [name], shard=(rank, world))[name]
            expected = chunks[rank] if rank < len(chunks) else mask[:0]
            start, stop = part.rows
            assert (start, stop) == shard_rows(mask.shape[0], rank, world)
            assert torch.equal(part.flags(part.rows).bool(), expected), (name, rank)
            assert part.nbytes <= expected.numel() // 8 + 2  # only the bytes holding those rows were read
            bits = int8_keep_bits(part, part.rows, "cpu")
            assert bits.dtype == torch.int8 and torch.equal(bits, expected.to(torch.int8).neg())
            if stop > start and not part.whole:
                with pytest.raises(ValueError, match="holds rows"):
                    part.unpack()


def test_int8_keep_bits_of_a_bool_mask_and_of_its_packed_form_agree():
    mask = random_masks()["a.weight"]
    for rows in (None, (0, 64), (10, 37), (63, 64)):
        assert torch.equal(
            int8_keep_bits(mask, rows, "cpu"), int8_keep_bits(PackedMask.of(mask), rows, "cpu")
        )
    with pytest.raises(TypeError, match="bool tensor"):
        PackedMask.of(mask.to(torch.int8))
