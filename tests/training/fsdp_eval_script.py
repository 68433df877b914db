"""Worker for tests/training/test_sharding.py: `torchrun --nproc_per_node=2 fsdp_eval_script.py PRUNED OUT`.

Two CPU processes with gloo and raw FSDP2, the path the Trainer takes on accelerators under
`fsdp_config = {cpu_ram_efficient_loading: true}` (the Trainer itself runs plain DDP on CPUs). Each rank
writes what it saw to OUT/rank{N}.json:

1. load: `load_for_training` reads the weights on rank 0 only; rank 1 builds the model on the meta
   device. accelerate's own FSDP2 preparation (`fsdp2_prepare_model`, which the Trainer calls) shards
   both and broadcasts rank 0's weights. The masks are read bit-packed, each rank only its shard's rows.
2. train: a few AdamW steps with `SparsityMaskCallback` on those shard masks.
3. eval: `trained_model_for_eval` on both ranks; rank 0 evaluates the copy alone while rank 1 waits.
4. hang: rank 0 evaluates the sharded model alone, as the pipeline did; it stays blocked in its first
   all-gather until rank 1 joins the same forward passes (released here; in a run, the 6 h timeout).
"""

import json
import logging
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin, extract_model_from_parallel
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from transformers import AutoModelForCausalLM

import hfprune.training.sharding
from hfprune.callbacks import SparsityMaskCallback
from hfprune.eval.perplexity import perplexity
from hfprune.masks.storage import load_masks
from hfprune.training.sharding import load_for_training, masks_for_training, trained_model_for_eval


ARGS = {"fsdp": True, "fsdp_config": {"cpu_ram_efficient_loading": True}}
MASKS = "sparsity_masks.safetensors"
VOCAB, SEQ = 384, 16
BLOCKED_FOR = 3.0  # seconds rank 0 is left alone in phase 4 (it cannot finish before rank 1 joins)


def prepare_like_the_trainer(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """accelerate's FSDP2 preparation, as `Trainer` runs it with this fsdp_config."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        cpu_ram_efficient_loading=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        mixed_precision="no",
        is_main_process=rank == 0,
        device=torch.device("cpu"),
    )
    return fsdp2_prepare_model(accelerator, model)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (a collective: the same order on every rank)."""
    return {name: param.full_tensor().detach().clone() for name, param in model.named_parameters()}


def phase_load(folder: Path, rank: int) -> tuple[torch.nn.Module, dict, dict]:
    model = load_for_training(folder, ARGS)
    report = {
        "meta_parameters": sum(p.is_meta for p in model.parameters()),
        "parameters": sum(1 for _ in model.parameters()),
        "meta_buffers": sum(b.is_meta for b in model.buffers()),
    }
    masks = masks_for_training(folder / MASKS, ARGS)
    report["mask_rows"] = {name: list(mask.rows) for name, mask in masks.items()}
    report["mask_bytes"] = sum(mask.nbytes for mask in masks.values())
    model = prepare_like_the_trainer(model, rank)
    expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    loaded = full_weights(model)
    report["weights_match"] = all(torch.equal(value, expected[name]) for name, value in loaded.items())
    report["sharded"] = hfprune.training.sharding.is_sharded(model)
    return model, masks, report


def phase_train(model: torch.nn.Module, masks: dict, folder: Path, rank: int) -> dict:
    callback = SparsityMaskCallback(masks)
    control = SimpleNamespace()
    callback.on_train_begin(None, None, control, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        ids = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(10 * step + rank))
        model(input_ids=ids, labels=ids).loss.backward()
        callback.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), control, model=model)
        optimizer.step()
        callback.on_optimizer_step(None, None, control, model=model)
        optimizer.zero_grad()
    callback.verify(model)
    whole = load_masks(folder / MASKS)
    weights = full_weights(model)
    return {
        "masked_nonzeros": sum(int(weights[name][~keep].count_nonzero()) for name, keep in whole.items()),
        "packed_masks_kept": all(type(m).__name__ == "PackedMask" for m in callback.masks.values()),
        "keep_bits": sorted({str(bits.dtype) for bits in callback._keep_bits.values()}),
    }, weights


def phase_eval(model: torch.nn.Module, weights: dict, windows: torch.Tensor, rank: int) -> dict:
    together = perplexity(model, windows, False, {}).value  # both ranks run the sharded forward
    trainer = SimpleNamespace(
        model=model,
        model_wrapped=model,
        accelerator=SimpleNamespace(unwrap_model=extract_model_from_parallel),
        is_deepspeed_enabled=False,
    )
    copy = trained_model_for_eval(trainer)
    report = {"together": together, "got_copy": copy is not None}
    if copy is not None:  # rank 0, alone: rank 1 is already waiting at the barrier below
        report["alone"] = perplexity(copy, windows, False, {}).value
        report["copy_sharded"] = hfprune.training.sharding.is_sharded(copy)
        state = dict(copy.named_parameters())
        report["copy_matches"] = all(torch.equal(state[name], value) for name, value in weights.items())
        report["copy_type"] = type(copy).__name__
    dist.barrier()
    return report


def phase_hang(model: torch.nn.Module, windows: torch.Tensor, out: Path, rank: int) -> dict:
    flag = out / "rank0-was-left-alone"
    if rank == 1:
        while not flag.exists():  # not a collective: rank 1 takes no part until rank 0 says so
            time.sleep(0.05)
        perplexity(model, windows, False, {})  # the same forward passes: releases rank 0
        return {}
    result: dict = {}

    def alone() -> None:
        try:
            result["value"] = perplexity(model, windows, False, {}).value
        except Exception as error:  # noqa: BLE001  (reported, not raised: the test says what happened)
            result["error"] = repr(error)

    thread = threading.Thread(target=alone, daemon=True)
    thread.start()
    thread.join(BLOCKED_FOR)
    blocked = thread.is_alive()
    flag.write_text("")
    thread.join()
    return {"blocked_alone": blocked, **result}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # accelerate shards only on accelerators (on CPUs the Trainer falls back to DDP); FSDP2 itself
    # runs on gloo, so the sharded path is taken here as it would be on GPUs.
    hfprune.training.sharding._accelerator_available = lambda: True
    model, masks, report = phase_load(folder, rank)
    report["train"], weights = phase_train(model, masks, folder, rank)
    windows = torch.randint(2, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(99))
    report["eval"] = phase_eval(model, weights, windows, rank)
    report["hang"] = phase_hang(model, windows, out, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
