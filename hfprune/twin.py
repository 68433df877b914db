"""The random-init twin of a pruned model: the "scratch" arm of the comparison.

After pruning, the pipeline trains two models on the same token stream: the pruned model itself
("continued") and a twin with the identical architecture, hence the identical parameter count, whose
weights come from the model's own initialiser ("scratch"). For sparse pruning the twin carries the same
masks: its surviving weights are freshly initialised and its pruned weights are zero, so both arms
train the same sparse structure.
"""

import copy
import logging
from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from hfprune.architectures import architecture_of
from hfprune.callbacks.sparsity_mask import canonical_name


logger = logging.getLogger(__name__)


def make_scratch_twin(
    pruned_model: PreTrainedModel,
    *,
    seed: int,
    masks: Mapping[str, torch.Tensor] | None = None,
    reinit_embeddings_and_norms: bool = True,
) -> PreTrainedModel:
    """A freshly initialised model with the pruned model's class and config.

    The weights come from the model class's own initialiser (as `AutoModelForCausalLM.from_config`
    would produce) under `torch.manual_seed(seed)`, generated on the CPU in float32 and then moved to the
    pruned model's device and dtype, so the same seed gives the same twin everywhere. The global RNG
    state is left as it was. Tied input and output embeddings stay tied.

    Args:
        pruned_model: The pruned model; only its config, class, dtype and device are used, plus its
            embeddings and norms when `reinit_embeddings_and_norms` is False.
        seed: Seed of the initialisation.
        masks: Sparse keep-masks (parameter name -> bool tensor, True = keep). Masked weights of the twin
            are set to zero; surviving weights keep their fresh values.
        reinit_embeddings_and_norms: If False, the `nn.Embedding` and normalisation weights are copied
            from `pruned_model` (what the paper's sparse re-init code did); if True, every weight is new.

    Returns:
        The twin, in eval mode like any `from_pretrained` model.
    """
    config = copy.deepcopy(pruned_model.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        twin = type(pruned_model)(config)
    reference = next(pruned_model.parameters())
    twin.to(device=reference.device, dtype=reference.dtype)
    twin.eval()
    if not reinit_embeddings_and_norms:
        copied = _copy_embeddings_and_norms(pruned_model, twin)
        logger.info("Scratch twin keeps the parent's embeddings and norms: %s", ", ".join(copied))
    if masks:
        _apply_masks(twin, masks)
    return twin


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
def _copy_embeddings_and_norms(source: nn.Module, target: PreTrainedModel) -> list[str]:
    source_params = dict(source.named_parameters(remove_duplicate=False))
    target_params = dict(target.named_parameters(remove_duplicate=False))
    names = _embedding_and_norm_names(target)
    for name in names:
        # A tied output head shares this storage, so it receives the copy as well and stays tied.
        target_params[name].copy_(source_params[name])
    return names


@torch.no_grad()
def _apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    params = {canonical_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    for name, keep in masks.items():
        param = params.get(canonical_name(name))
        if param is None:
            raise KeyError(f"mask names a parameter the twin does not have: {name!r}")
        if keep.dtype != torch.bool or tuple(keep.shape) != tuple(param.shape):
            raise ValueError(
                f"mask for {name} must be a bool tensor of shape {tuple(param.shape)}, "
                f"got {keep.dtype} {tuple(keep.shape)}"
            )
        param.masked_fill_(~keep.to(param.device), 0)
