"""The random-init twin of a pruned model: the "scratch" arm of the comparison.

After pruning, the pipeline trains two models on the same token stream: the pruned model itself
("continued") and a twin with the identical architecture, hence the identical parameter count, whose
weights come from the model's own initialiser ("scratch"). For sparse pruning the twin carries the same
masks: its surviving weights are freshly initialised and its pruned weights are zero, so both arms
train the same sparse structure.

The train stage builds the twin from the pruned model's folder (`scratch_twin_from_folder`): from its
config, reading at most the embeddings and norms from its weights, so the pruned weights are never in
memory beside the twin (at 8B that was a second 30 GiB copy). Under FSDP with
`cpu_ram_efficient_loading`, processes other than rank 0 build it `empty` (parameters on the meta
device, filled by FSDP from rank 0). The weights of a given seed are the same either way.
"""

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel

from hfprune.architectures.registry import architecture_of
from hfprune.callbacks.sparsity_mask import canonical_name
from hfprune.masks.packed import KeepMask, PackedMask


logger = logging.getLogger(__name__)


def scratch_twin_from_folder(
    folder: str | Path,
    *,
    seed: int,
    masks: Mapping[str, KeepMask] | None = None,
    reinit_embeddings_and_norms: bool = True,
    dtype: torch.dtype = torch.float32,
    empty: bool = False,
) -> PreTrainedModel:
    """The twin of the model saved in `folder`, without loading that model's weights.

    The weights come from the model class's own initialiser (as `AutoModelForCausalLM.from_config`
    would produce) under `torch.manual_seed(seed)`, generated on the CPU in float32 and then cast to
    `dtype`, so the same seed gives the same twin everywhere. The global RNG state is left as it was.
    Tied input and output embeddings stay tied.

    Args:
        folder: The saved pruned model; its config is read, and its embeddings and norms only when
            `reinit_embeddings_and_norms` is False.
        seed: Seed of the initialisation.
        masks: Sparse keep-masks (parameter name -> bool tensor, True = keep, or a whole `PackedMask`).
            Masked weights of the twin are set to zero; surviving weights keep their fresh values.
        reinit_embeddings_and_norms: If False, the `nn.Embedding` and normalisation weights are copied
            from the folder (what the paper's sparse re-init code did); if True, every weight is new.
        dtype: The twin's dtype.
        empty: Leave the parameters on the meta device (buffers are real) for a process that receives
            its weights from another: no initialisation runs.

    Returns:
        The twin, on the CPU, in eval mode like any `from_pretrained` model.
    """
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    config.dtype = dtype  # what from_pretrained(dtype=...) records, so a saved twin says the same
    cls = causal_lm_class(config)
    if empty:
        return empty_model(cls, config).to(dtype=dtype).eval()
    twin = seeded_model(cls, config, seed).to(dtype=dtype).eval()
    if not reinit_embeddings_and_norms:
        copied = _copy_embeddings_and_norms(twin, lambda names: _checkpoint_tensors(folder, names))
        logger.info("Scratch twin keeps the pruned model's embeddings and norms: %s", ", ".join(copied))
    if masks:
        _apply_masks(twin, masks)
    return twin


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class `AutoModelForCausalLM` builds for `config` (its public config-to-class mapping, which
    also holds classes registered with `AutoModelForCausalLM.register`)."""
    found = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if isinstance(found, (list, tuple)):  # several classes for one config: the one the config names
        named = set(config.architectures or [])
        found = next((cls for cls in found if cls.__name__ in named), found[0])
    return found


def empty_model(cls: type[PreTrainedModel], config: PretrainedConfig) -> PreTrainedModel:
    """`cls(config)` with its parameters on the meta device and real buffers (rotary tables and the
    like, which nothing broadcasts), tied weights tied: a shell for weights that arrive later."""
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    model.tie_weights()  # init_empty_weights re-creates parameters, which unties them
    return model


def seeded_model(cls: type[PreTrainedModel], config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """`cls(config)` on the CPU in float32 under `torch.manual_seed(seed)`, the global RNG untouched:
    the construction whose numbers every published scratch run has (do not reorder or defer it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def _embedding_and_norm_names(model: PreTrainedModel) -> list[str]:
    """Parameter names of the input embedding and of every norm the family's spec lists, in model order."""
    wanted = {id(module) for module in architecture_of(model.config).norm_modules(model)}
    wanted.add(id(model.get_input_embeddings()))
    names = []
    for module_name, module in model.named_modules():
        if id(module) in wanted:
            prefix = f"{module_name}." if module_name else ""
            names.extend(prefix + name for name, _ in module.named_parameters(recurse=False))
    return names


@torch.no_grad()
def _copy_embeddings_and_norms(
    target: PreTrainedModel, read: Callable[[list[str]], Mapping[str, torch.Tensor]]
) -> list[str]:
    """Copy the embedding and norm weights into `target`; `read(names)` gives name -> source tensor."""
    target_params = dict(target.named_parameters(remove_duplicate=False))
    names = _embedding_and_norm_names(target)
    for name, value in read(names).items():
        # A tied output head shares this storage, so it receives the copy as well and stays tied.
        target_params[name].copy_(value)
    return names


def _checkpoint_tensors(folder: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of the safetensors checkpoint in `folder` (one file or an indexed set)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    else:
        where = dict.fromkeys(
            safe_open(str(folder / "model.safetensors"), framework="pt").keys(), "model.safetensors"
        )
    missing = [name for name in names if name not in where]
    if missing:
        raise KeyError(f"{folder}: the checkpoint has no {', '.join(map(repr, missing))}")
    tensors = {}
    for file in sorted({where[name] for name in names}):
        with safe_open(str(folder / file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in names if where[name] == file})
    return tensors


@torch.no_grad()
def _apply_masks(model: nn.Module, masks: Mapping[str, KeepMask]) -> None:
    params = {canonical_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    for name, mask in masks.items():
        param = params.get(canonical_name(name))
        if param is None:
            raise KeyError(f"mask names a parameter the twin does not have: {name!r}")
        keep = mask.unpack() if isinstance(mask, PackedMask) else mask  # one parameter's bools at a time
        if keep.dtype != torch.bool or tuple(keep.shape) != tuple(param.shape):
            raise ValueError(
                f"mask for {name} must be a bool tensor of shape {tuple(param.shape)}, "
                f"got {keep.dtype} {tuple(keep.shape)}"
            )
        param.masked_fill_(~keep.to(param.device), 0)
