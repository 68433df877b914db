"""Training at scale, host side: weights read once, masks per shard, a whole model to evaluate after FSDP.

The train stage (`hfprune.pipeline.stages.train`) calls these through `hfprune.training.train`, on every process:

- `load_for_training(folder, args)`: the pruned model with float32 master weights. Under FSDP with
  `fsdp_config.cpu_ram_efficient_loading` on accelerators, only rank 0 reads the weights; the other
  processes build the model on the meta device (buffers real), and accelerate's FSDP preparation sends
  rank 0's weights to every shard (FSDP2: a full state-dict broadcast from rank 0; FSDP1:
  `sync_module_states`). At 8B that is one 30 GiB copy per job instead of one per process. Otherwise
  every process loads the model as before.
- `twin_for_training(folder, args, ...)`: the scratch twin the same way (rank 0 initialises it from
  the seed, the others build it empty), never beside a loaded copy of the pruned weights.
- `masks_for_training(path, args, ...)`: keep-masks left bit-packed; under FSDP only the rows of this
  process's shard.
- `trained_model_for_eval(trainer)`: after training, a model that one process can evaluate alone.
  A sharded model cannot be: its forward all-gathers parameters from every process, so rank 0
  evaluating alone (the pipeline evaluates on rank 0) waits for the others until the collective
  timeout. Every process calls this; the full state dict is gathered onto rank 0's CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, TrainingArguments

from hfprune import distributed
from hfprune.masks.packed import PackedMask
from hfprune.masks.storage import load_packed_masks
from hfprune.models.twin import causal_lm_class, empty_model, scratch_twin_from_folder


logger = logging.getLogger(__name__)

TrainArgs = TrainingArguments | Mapping[str, Any]
"""`TrainingArguments`, or the recipe's `train.args` mapping they are made from."""


def fsdp_settings(args: TrainArgs) -> dict[str, Any] | None:
    """The `fsdp_config` of `args` (keys without their optional `fsdp_` prefix; a JSON file is read), or
    None when `args` do not turn FSDP on (`fsdp` false, empty or absent)."""
    if isinstance(args, TrainingArguments):
        enabled, config = args.fsdp, args.fsdp_config
    else:
        enabled, config = args.get("fsdp"), args.get("fsdp_config")
    if not enabled:
        return None
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    return {key.removeprefix("fsdp_"): value for key, value in dict(config or {}).items()}


def ram_efficient_loading(args: TrainArgs) -> bool:
    """Whether `args` ask for FSDP with `cpu_ram_efficient_loading` (rank 0 loads, the rest wait on meta)."""
    settings = fsdp_settings(args)
    return settings is not None and _truthy(settings.get("cpu_ram_efficient_loading", False))


def sharded_training(args: TrainArgs) -> bool:
    """Whether the Trainer will shard the parameters: FSDP asked for, several processes, and an
    accelerator (on CPUs accelerate runs plain DDP whatever the arguments say)."""
    return fsdp_settings(args) is not None and distributed.world_size() > 1 and _accelerator_available()


def materialises_weights(args: TrainArgs) -> bool:
    """Whether this process holds real weights before the Trainer shards them: every process, except
    under `cpu_ram_efficient_loading`, where only rank 0 does."""
    efficient = sharded_training(args) and ram_efficient_loading(args)
    return not efficient or distributed.is_main_process()


def load_for_training(folder: str | Path, args: TrainArgs) -> PreTrainedModel:
    """The model in `folder` for training: float32 master weights whatever the checkpoint's dtype (bf16
    compute comes from `train.args`), or an empty shell on processes that FSDP will fill from rank 0."""
    folder = Path(folder)
    if materialises_weights(args):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder)
    config.dtype = torch.float32
    logger.info("not reading %s here: FSDP brings rank 0's weights (cpu_ram_efficient_loading)", folder)
    return empty_model(causal_lm_class(config), config).to(torch.float32).eval()


def twin_for_training(
    folder: str | Path,
    args: TrainArgs,
    *,
    seed: int,
    masks: Mapping[str, Any] | None = None,
    reinit_embeddings_and_norms: bool = True,
) -> PreTrainedModel:
    """The scratch twin of the model in `folder` (`hfprune.models.twin.scratch_twin_from_folder`), in float32;
    empty where `load_for_training` would be. `masks` must be whole here (`masks_for_training(...,
    twin=True)`); an empty twin ignores them (its weights come from rank 0, masks applied)."""
    empty = not materialises_weights(args)
    return scratch_twin_from_folder(
        folder,
        seed=seed,
        masks=None if empty else masks,
        reinit_embeddings_and_norms=reinit_embeddings_and_norms,
        empty=empty,
    )


def masks_for_training(
    path: str | Path, args: TrainArgs, *, twin: bool = False
) -> dict[str, PackedMask] | None:
    """The keep-masks in `path` (None when there is no such file), bit-packed: under sharded training
    only the rows of this process's FSDP2 shard, except where this process also builds a twin to
    mask (`twin=True` on a process that materialises weights), which needs them whole."""
    path = Path(path)
    if not path.exists():
        return None
    whole = not sharded_training(args) or (twin and materialises_weights(args)) or _replicated(args)
    shard = None if whole else (int(os.environ.get("RANK", "0")), distributed.world_size())
    return load_packed_masks(path, shard=shard)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module`'s parameters are split across processes (FSDP2 DTensors, FSDP1 units,
    DeepSpeed ZeRO-3 partitions), which makes its forward a collective."""
    if any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in module.parameters()):
        return True
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def trained_model_for_eval(trainer: Any) -> PreTrainedModel | None:
    """The trained model for this process to evaluate alone, or None: then evaluate the folder
    `save_trained` wrote. Every process calls it after training (a collective when sharded).

    Unsharded (one process, DDP): the trained model itself. FSDP: rank 0 gets an unsharded float32
    copy on the CPU, gathered from every process (`unsharded_copy`); the others get None. DeepSpeed
    ZeRO-3: None everywhere.
    """
    plain = trainer.accelerator.unwrap_model(trainer.model)
    wrapped = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    if not (is_sharded(wrapped) or is_sharded(plain)):
        return plain
    if getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return unsharded_copy(wrapped, plain)


def unsharded_copy(sharded: nn.Module, plain: nn.Module) -> PreTrainedModel | None:
    """A plain copy of an FSDP-sharded model on rank 0's CPU; None on the other processes.

    Collective: every process must call it, at the same point. `sharded` is the module FSDP wrapped
    (FSDP1's root wrapper, or the model itself under FSDP2); `plain` the model without wrappers, whose
    class and config the copy takes.
    """
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    cls = next(c for c in type(plain).__mro__ if not issubclass(c, FSDPModule))
    if not issubclass(cls, PreTrainedModel):
        logger.warning("a sharded %s is not rebuilt here: evaluate its saved folder", cls.__name__)
        return None
    model = empty_model(cls, copy.deepcopy(plain.config))
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if unexpected or left:
        raise RuntimeError(
            f"gathering the trained {cls.__name__}: unexpected keys {unexpected[:3]}, "
            f"parameters left without weights {left[:3]}"
        )
    model.generation_config = copy.deepcopy(plain.generation_config)
    return model.eval()


def _replicated(args: TrainArgs) -> bool:
    """Whether shards are also replicated (HSDP: `hybrid_shard`, or a `parallelism_config`), so that a
    process's shard index is not its rank: such processes take the masks whole."""
    if isinstance(args, TrainingArguments):
        enabled, parallel = args.fsdp, getattr(args, "parallelism_config", None)
    else:
        enabled, parallel = args.get("fsdp"), args.get("parallelism_config")
    words = [str(enabled), *map(str, (fsdp_settings(args) or {}).values())]
    return parallel is not None or any("hybrid" in word.lower() for word in words)


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in {"true", "1", "yes"}


def _accelerator_available() -> bool:
    return torch.accelerator.is_available()
