"""Training at scale, host side (hfprune.training.sharding through hfprune.training.train): which processes read the
weights, masks kept bit-packed and per shard, and evaluation after FSDP training.

The FSDP path itself runs in two real processes (torchrun, gloo, raw FSDP2 prepared by accelerate's own
`fsdp2_prepare_model`) in tests/training/fsdp_eval_script.py; one launch serves every test that reads `ranks`.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from conftest import tiny_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, LlamaForCausalLM, TrainingArguments

import hfprune.training.sharding
from hfprune.callbacks import SparsityMaskCallback
from hfprune.masks.packed import PackedMask
from hfprune.masks.storage import load_packed_masks, save_masks
from hfprune.models.twin import scratch_twin_from_folder
from hfprune.trainer import PruneTrainer
from hfprune.training.sharding import (
    load_for_training,
    masks_for_training,
    trained_model_for_eval,
    twin_for_training,
)


SCRIPT = Path(__file__).with_name("fsdp_eval_script.py")
REPO = Path(__file__).resolve().parents[2]
EFFICIENT = {"fsdp": True, "fsdp_config": {"cpu_ram_efficient_loading": True}}
WORLD = 2


def layer_masks(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=gen) < 0.5
        for name, p in model.named_parameters()
        if ".layers." in name and p.ndim == 2
    }


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A sparse tiny model saved in bf16 with its mask file, as the prune stage leaves it."""
    folder = tmp_path_factory.mktemp("pruned")
    model = tiny_model(num_hidden_layers=2, max_position_embeddings=64)
    masks = layer_masks(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].masked_fill_(~keep, 0)
    model.to(torch.bfloat16).save_pretrained(folder)
    save_masks(masks, folder / "sparsity_masks.safetensors")
    return folder


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().items(), b.state_dict().items(), strict=True)
    return all(x == y and torch.equal(u, v) for (x, u), (y, v) in pairs)


def as_process(monkeypatch, rank: int, world: int, accelerator: bool) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(hfprune.training.sharding, "_accelerator_available", lambda: accelerator)


# ---- FSDP settings: what the arguments ask for ----


@pytest.mark.parametrize(
    ("args", "settings"),
    [
        ({}, None),
        ({"fsdp": False, "fsdp_config": {"cpu_ram_efficient_loading": True}}, None),
        ({"fsdp": ""}, None),
        ({"fsdp": True}, {}),
        ({"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}}, {"version": 2}),
        (
            {"fsdp": ["full_shard"], "fsdp_config": {"cpu_ram_efficient_loading": "true"}},
            {"cpu_ram_efficient_loading": "true"},
        ),
    ],
)
def test_fsdp_settings_read_the_recipe_args(args, settings):
    assert hfprune.training.sharding.fsdp_settings(args) == settings


def test_ram_efficient_loading_from_args_a_json_file_and_training_arguments(tmp_path):
    assert hfprune.training.sharding.ram_efficient_loading(EFFICIENT)
    assert hfprune.training.sharding.ram_efficient_loading(
        {"fsdp": True, "fsdp_config": {"fsdp_cpu_ram_efficient_loading": "True"}}
    )
    assert not hfprune.training.sharding.ram_efficient_loading(
        {"fsdp": True, "fsdp_config": {"cpu_ram_efficient_loading": "false"}}
    )
    assert not hfprune.training.sharding.ram_efficient_loading({"fsdp": True})
    assert not hfprune.training.sharding.ram_efficient_loading(
        {"fsdp_config": {"cpu_ram_efficient_loading": True}}
    )
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"fsdp_cpu_ram_efficient_loading": True}))
    assert hfprune.training.sharding.ram_efficient_loading({"fsdp": True, "fsdp_config": str(config)})
    # TrainingArguments (FSDP asked for on a CPU machine: the Trainer would run DDP, the settings stand)
    args = TrainingArguments(
        str(tmp_path / "out"), use_cpu=True, report_to=[], fsdp=True, fsdp_config=str(config)
    )
    assert hfprune.training.sharding.ram_efficient_loading(args)
    assert not hfprune.training.sharding.ram_efficient_loading(
        TrainingArguments(str(tmp_path / "o2"), use_cpu=True, report_to=[])
    )


@pytest.mark.parametrize(
    ("rank", "world", "accelerator", "sharded", "materialises"),
    [
        (1, 2, True, True, False),  # the only case where a process waits for rank 0's weights
        (0, 2, True, True, True),
        (1, 2, False, False, True),  # on CPUs the Trainer runs DDP: every process needs real weights
        (0, 1, True, False, True),
    ],
)
def test_which_processes_read_the_weights(monkeypatch, rank, world, accelerator, sharded, materialises):
    as_process(monkeypatch, rank, world, accelerator)
    assert hfprune.training.sharding.sharded_training(EFFICIENT) is sharded
    assert hfprune.training.sharding.materialises_weights(EFFICIENT) is materialises
    assert (
        hfprune.training.sharding.materialises_weights({"fsdp": True}) is True
    )  # without the option: all do


# ---- Loading the model and the twin ----


def test_load_for_training_is_unchanged_without_ram_efficient_fsdp(pruned, monkeypatch):
    expected = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    as_process(monkeypatch, 1, 2, accelerator=False)
    for args in ({}, {"fsdp": True}, EFFICIENT):
        model = load_for_training(pruned, args)
        assert model.dtype == torch.float32 and not model.training
        assert model.state_dict().keys() == expected.state_dict().keys()
        assert same_weights(model, expected)
        assert model.config.to_dict() == expected.config.to_dict()


def test_only_rank_zero_reads_the_weights_under_ram_efficient_fsdp(pruned, monkeypatch):
    as_process(monkeypatch, 1, 2, accelerator=True)
    shell = load_for_training(pruned, EFFICIENT)
    assert all(p.is_meta for p in shell.parameters())
    assert not any(b.is_meta for b in shell.buffers())  # rotary tables: nothing broadcasts them
    as_process(monkeypatch, 0, 2, accelerator=True)
    real = load_for_training(pruned, EFFICIENT)
    assert not any(p.is_meta for p in real.parameters())
    assert [(n, p.shape, p.dtype) for n, p in shell.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in real.named_parameters()
    ]
    for (name, buffer), (_, expected) in zip(shell.named_buffers(), real.named_buffers(), strict=True):
        assert torch.equal(buffer, expected), name


def test_twin_for_training_is_initialised_on_rank_zero_only(pruned, monkeypatch):
    masks = masks_for_training(pruned / "sparsity_masks.safetensors", {}, twin=True)
    expected = scratch_twin_from_folder(pruned, seed=3, masks=masks)
    as_process(monkeypatch, 0, 2, accelerator=True)
    twin = twin_for_training(pruned, EFFICIENT, seed=3, masks=masks)
    assert same_weights(twin, expected)
    as_process(monkeypatch, 1, 2, accelerator=True)
    assert all(p.is_meta for p in twin_for_training(pruned, EFFICIENT, seed=3, masks=masks).parameters())


# ---- Masks: packed, per shard ----


def test_masks_for_training_whole_or_this_process_shard(pruned, monkeypatch):
    path = pruned / "sparsity_masks.safetensors"
    assert masks_for_training(pruned / "missing.safetensors", EFFICIENT) is None
    name = "model.layers.0.mlp.up_proj.weight"  # 128 rows
    cases = [
        # (rank, accelerator, args, twin) -> rows of `name`
        ((1, False, EFFICIENT, False), (0, 128)),  # DDP on CPUs: whole
        ((1, True, EFFICIENT, False), (64, 128)),
        ((0, True, EFFICIENT, False), (0, 64)),
        ((0, True, EFFICIENT, True), (0, 128)),  # rank 0 masks the twin it initialises
        ((1, True, EFFICIENT, True), (64, 128)),  # rank 1's twin is an empty shell
        ((1, True, {"fsdp": True}, True), (0, 128)),  # every process initialises its twin
    ]
    hybrid = [  # HSDP: the shard index is not the rank, so the masks come whole
        {"fsdp": True, "fsdp_config": {"reshard_after_forward": "hybrid_shard"}},
        {"fsdp": "hybrid_shard auto_wrap"},
        {"fsdp": True, "parallelism_config": {"dp_replicate_size": 2}},
    ]
    cases += [((1, True, args, False), (0, 128)) for args in hybrid]
    for (rank, accelerator, args, twin), rows in cases:
        as_process(monkeypatch, rank, 2, accelerator)
        masks = masks_for_training(path, args, twin=twin)
        assert all(isinstance(mask, PackedMask) for mask in masks.values())
        assert masks[name].rows == rows, (rank, accelerator, args, twin)


def test_callback_and_prune_trainer_take_packed_masks_without_a_bool_copy(tmp_path, pruned):
    path = pruned / "sparsity_masks.safetensors"
    packed, whole = load_packed_masks(path), {n: m.unpack() for n, m in load_packed_masks(path).items()}

    def train(masks) -> tuple[PruneTrainer, torch.nn.Module]:
        model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
        args = TrainingArguments(
            str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=3, per_device_train_batch_size=2,
            learning_rate=1e-2, save_strategy="no", disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = PruneTrainer(model=model, args=args, train_dataset=Tokens(), masks=masks)
        trainer.train()
        return trainer, model

    trainer, model = train(packed)
    callback = trainer.mask_callbacks[0]
    assert all(isinstance(mask, PackedMask) for mask in callback.masks.values())
    assert {bits.dtype for bits in callback._keep_bits.values()} == {torch.int8}
    _, reference = train(whole)  # the same run with bool masks: the very same weights
    for (name, value), expected in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(value, expected), name
    params = dict(model.named_parameters())
    assert all(int(params[n][~keep].count_nonzero()) == 0 for n, keep in whole.items())


def test_a_shard_of_a_mask_on_an_unsharded_model_is_refused(pruned):
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    shard = load_packed_masks(pruned / "sparsity_masks.safetensors", shard=(1, 2))
    match = r"mask for model\.layers\.0\.self_attn\.q_proj\.weight: .*holds rows 32\.\.64 .*not rows 0\.\.64"
    with pytest.raises(ValueError, match=match):
        SparsityMaskCallback(shard).apply_to_weights(model)
    with pytest.raises(TypeError, match="bool tensor .* or a PackedMask"):
        SparsityMaskCallback({"model.layers.0.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.int8)})


class Tokens(Dataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 384, (8, 16), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


# ---- Evaluation after training ----


def test_an_unsharded_trained_model_is_evaluated_as_it_is(pruned):
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    wrapper = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(wrapper)
    wrapper.module = model
    trainer = SimpleNamespace(
        model=model,
        model_wrapped=wrapper,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m.module if m is wrapper else m),
    )
    assert trained_model_for_eval(trainer) is model
    assert not hfprune.training.sharding.is_sharded(wrapper)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tie", [False, True])
def test_a_sharded_model_is_gathered_into_a_whole_copy(one_process_group, tie):
    """FSDP2 on one process (a real setup: one GPU) takes the gathering path as on many."""
    model = tiny_model(num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=tie)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert hfprune.training.sharding.is_sharded(model)
    trainer = SimpleNamespace(
        model=model,
        model_wrapped=model,
        accelerator=SimpleNamespace(unwrap_model=extract_model_from_parallel),
        is_deepspeed_enabled=False,
    )
    copy = trained_model_for_eval(trainer)
    assert (
        type(copy) is LlamaForCausalLM
        and not hfprune.training.sharding.is_sharded(copy)
        and not copy.training
    )
    assert copy.state_dict().keys() == expected.keys()
    assert all(torch.equal(copy.state_dict()[name], value) for name, value in expected.items())
    assert (copy.lm_head.weight is copy.model.embed_tokens.weight) is tie
    ids = torch.randint(2, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.fixture(scope="module")
def ranks(pruned, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp_eval")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    # The timeout only guards against a hung collective; it is not a performance assertion.
    done = subprocess.run(
        [*command, str(SCRIPT), str(pruned), str(out)],
        cwd=SCRIPT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_fsdp_weights_are_read_by_rank_zero_only_and_reach_every_shard(ranks):
    zero, one = ranks
    assert zero["meta_parameters"] == 0
    assert one["meta_parameters"] == one["parameters"] > 0 and one["meta_buffers"] == 0
    assert zero["sharded"] and one["sharded"]
    assert zero["weights_match"] and one["weights_match"]  # accelerate broadcast rank 0's weights


def test_fsdp_masks_are_per_shard_bit_packed_and_hold(ranks, pruned):
    shapes = {n: m.shape for n, m in load_packed_masks(pruned / "sparsity_masks.safetensors").items()}
    zero, one = ranks
    assert zero["mask_rows"].keys() == one["mask_rows"].keys() == shapes.keys()
    for name, shape in shapes.items():
        assert zero["mask_rows"][name] == [0, shape[0] // 2]
        assert one["mask_rows"][name] == [shape[0] // 2, shape[0]]
    for rank in ranks:  # one bit per weight of the shard: a sixteenth of bool masks on two processes
        assert rank["mask_bytes"] == sum(math.prod(shape) for shape in shapes.values()) // 16
        assert rank["train"]["masked_nonzeros"] == 0
        assert rank["train"]["packed_masks_kept"] and rank["train"]["keep_bits"] == ["torch.int8"]


def test_fsdp_evaluation_gets_a_whole_copy_on_rank_zero(ranks):
    zero, one = ranks
    assert zero["eval"]["got_copy"] and not one["eval"]["got_copy"]
    assert zero["eval"]["copy_type"] == "LlamaForCausalLM" and not zero["eval"]["copy_sharded"]
    assert zero["eval"]["copy_matches"]  # the trained weights, gathered
    assert zero["eval"]["alone"] == zero["eval"]["together"] == one["eval"]["together"]


def test_rank_zero_alone_blocks_on_the_sharded_model_until_the_others_join(ranks):
    hang = ranks[0]["hang"]
    assert hang["blocked_alone"], hang  # the pipeline's old way: it would wait out the collective timeout
    assert "error" not in hang and hang["value"] == ranks[0]["eval"]["together"]
