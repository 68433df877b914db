"""The training half of bench/gpu_check.py: a sparse-pruned model trained with `PruneTrainer` and its masks.

The model trains as the train stage trains it (fp32 master weights, bf16 autocast on a GPU, gradient
checkpointing, AdamW) for a fixed number of steps on random tokens, with the keep-masks passed to
`PruneTrainer(masks=...)`. When the whole model does not fit one device, `hfprune.plan.estimate` picks the micro
batch and the number of leading decoder layers (with their masks) that do. Reported: tokens/s after a
warm-up, MFU (model FLOPs 3 x forward per token, recomputation not counted, over the dense peak), peak
memory beside the plan's estimate, and whether every masked weight is still exactly zero.
"""

from __future__ import annotations

import tempfile
import time
from types import SimpleNamespace
from typing import Any

import torch
from results import PeakRSS
from transformers import TrainerCallback, TrainingArguments

from hfprune.models.structure import updated_config
from hfprune.plan.estimate import DEVICE_RESERVE
from hfprune.plan.terms import Shape
from hfprune.plan.train_eval import train_stage
from hfprune.trainer import PruneTrainer


class RandomTokens(torch.utils.data.Dataset):
    """`count` windows of random token ids, the same for a given index."""

    def __init__(self, count: int, seq_len: int, vocab: int) -> None:
        self.count, self.seq_len, self.vocab = count, seq_len, vocab

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (device synchronised)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def plan_training(setup: Any, config: Any, seq_len: int, micro: int, steps: int) -> tuple[int, int, Any]:
    """(layers, micro batch, plan stage): the largest leading part of the model that fits the device."""
    limit = None if setup.hardware.device_memory is None else setup.hardware.device_memory - DEVICE_RESERVE
    mixed = setup.device.type == "cuda"
    for batch in dict.fromkeys((micro, 1)):
        args = {"per_device_train_batch_size": batch, "bf16": mixed, "gradient_checkpointing": True}
        train = SimpleNamespace(args=args, seq_len=seq_len, token_budget=steps * batch * seq_len)
        for layers in range(config.num_hidden_layers, 0, -1):
            shape = Shape.from_config(updated_config(config, {"num_hidden_layers": layers}), "float32")
            stage = train_stage("continued", shape, train, 1, sparse=True)
            if limit is None or stage.total("device") <= limit:
                return layers, batch, stage
    raise SystemExit("not even one decoder layer trains on this device")


def truncate(model: Any, masks: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Keep the first `layers` decoder layers (in place) and the masks that belong to them."""
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return {
        name: mask
        for name, mask in masks.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers
    }


def masks_kept(model: Any, masks: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters())
    return all(bool((params[name].detach().cpu()[~mask] == 0).all()) for name, mask in masks.items())


def train_check(setup: Any, result: Any, steps: int) -> dict[str, Any]:
    seq_len, micro = (256, 2) if setup.small else (8192, 2)  # the FSDP recipe: 2 x 8192 per device
    model, total_layers = result.model, result.model.config.num_hidden_layers
    layers, micro, stage = plan_training(setup, model.config, seq_len, micro, steps)
    masks = truncate(model, result.masks, layers)
    model.config.use_cache = False
    model = model.float().train()  # fp32 master weights, as the train stage loads them
    cuda = setup.device.type == "cuda"
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=micro, learning_rate=1e-5,
            bf16=cuda, gradient_checkpointing=True, save_strategy="no", logging_strategy="no", report_to=[],
            use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        dataset = RandomTokens(steps * micro, seq_len, model.config.vocab_size)
        trainer = PruneTrainer(model=model, args=args, train_dataset=dataset, masks=masks, callbacks=[clock])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            trainer.train()
    warm = max(1, min(5, steps // 5))  # steps before timing starts (allocation, autotuning)
    tokens_per_s = (steps - warm) * micro * seq_len / (clock.times[-1] - clock.times[warm - 1])
    dtype = "bfloat16" if cuda else "float32"
    flops_per_token = 3 * Shape.from_config(model.config, "float32").forward_flops(seq_len)
    peak = setup.hardware.peak(dtype)
    what = "wanda-pruned model" + (
        "" if layers == total_layers else f", first {layers} of {total_layers} layers"
    )
    return {
        "what": what,
        "steps": steps,
        "batch": micro,
        "seq_len": seq_len,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / peak,
        "peak": peak,
        "dtype": dtype,
        "device_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "plan_device": stage.total("device") if cuda else None,
        "plan_host": stage.total("host") if cuda else stage.on_host_only().total("host"),
        "host_peak": rss.peak,
        "masks_kept": masks_kept(model, masks),
    }
