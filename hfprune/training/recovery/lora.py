"""LoRA recovery: the lora kind of the train stage, trained with peft and merged into a plain checkpoint.

`wrap_lora(model, spec, masks)` adds low-rank adapters to the spec's target projections; the Trainer
then trains only the adapters, on the same token budget, data and schedule as plain training.
`merge_lora(peft_model, masks)` folds them into the weights and returns the plain `PreTrainedModel`,
which saves without adapter files and loads with `AutoModelForCausalLM` alone.

Sparse models. A LoRA update `B @ A` is dense, so merging it as is would fill every pruned weight. hfprune
restricts the adapters instead of only masking at merge: for every adapted weight that has a keep-mask,
the adapter's update is `keep * (B @ A) * scaling` in the forward pass as well as in the merge (a peft
`LoraVariant`, `MaskedLora`). The model trained is then exactly the model merged, and pruned weights are
exactly zero after training and after the merge, also through peft's own `merge_and_unload()`. Masking
only at merge would silently drop the part of the trained update that falls on pruned weights (half of
it at 50% sparsity), so the published model would not be the one whose loss was measured. The price: a
restricted layer forms its dense masked update (out x in) in the forward and again in the backward
(recomputed, not kept), which costs about one extra dense matmul per adapted layer, not the memory of a
full copy of the weights.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn
from transformers import PreTrainedModel

from hfprune.callbacks.sparsity_mask import MASKED_DELTA_ATTR, SparsityMaskCallback, canonical_name
from hfprune.errors import InvalidInput
from hfprune.training.recovery.specs import LoraSpec


logger = logging.getLogger(__name__)


_KEEP_BUFFER = "hfprune_keep"


class LoraTargetError(InvalidInput, ValueError):
    """`train.lora.target_modules` names modules the model does not have."""


def wrap_lora(
    model: PreTrainedModel, spec: LoraSpec, masks: Mapping[str, torch.Tensor] | None = None
) -> PeftModel:
    """Add LoRA adapters to `model` (in place) and return the `PeftModel` to train.

    Args:
        model: A plain causal LM (the pruned model or its twin).
        spec: Rank, alpha, dropout and target modules (`train.lora`).
        masks: Keep-masks of a sparse model (plain parameter name -> bool tensor, True = keep); the
            adapters of masked weights only ever update kept entries (see the module docstring).
    """
    if isinstance(model, PeftModel):
        raise TypeError("wrap_lora expects a plain model; this one already carries PEFT adapters")
    _check_targets(model, spec.target_modules)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if masks:
        restricted = restrict_to_masks(peft_model, masks)
        logger.info("LoRA: %d adapted weights restricted to their sparsity masks", restricted)
    return peft_model


def merge_lora(peft_model: PeftModel, masks: Mapping[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """Merge the adapters into the weights and return the plain model (trainable, no PEFT left).

    With `masks`, every masked weight is exactly zero in the result. Adapters that `wrap_lora` restricted
    merge exactly what was trained; adapters trained dense are masked here, with a warning, since their
    update on pruned weights is dropped.
    """
    if masks:
        late = restrict_to_masks(peft_model, masks)
        if late:
            logger.warning(
                "merge_lora: %d adapted weights were trained with a dense update; masking it now drops its pruned "
                "entries, so the merged model differs from the trained one (pass masks= to wrap_lora to train "
                "exactly what merges)",
                late,
            )
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(True)  # peft froze the base weights; a plain model trains all of them
    if masks:
        keeper = SparsityMaskCallback(masks)
        escaped = keeper.count_escaped(merged)
        if escaped:
            logger.warning("merge_lora: zeroing %d masked weights that are nonzero", sum(escaped.values()))
        keeper.apply_to_weights(merged)
    return merged


def restrict_to_masks(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Make the adapters of masked weights update only kept entries; returns how many were newly restricted."""
    count = 0
    for layer, keep in _masked_lora_layers(peft_model, masks):
        if getattr(layer, MASKED_DELTA_ATTR, False):
            continue
        weight = layer.get_base_layer().weight
        layer.register_buffer(_KEEP_BUFFER, keep.to(weight.device), persistent=False)
        for adapter in layer.lora_A:
            layer.lora_variant[adapter] = MaskedLora()
        setattr(layer, MASKED_DELTA_ATTR, True)
        count += 1
    return count


def _masked_lora_layers(
    peft_model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> Iterator[tuple[LoraLinear, torch.Tensor]]:
    by_name = {canonical_name(name): keep for name, keep in masks.items()}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLinear):
            keep = by_name.get(canonical_name(f"{name}.base_layer.weight"))
            if keep is not None:
                if module.fan_in_fan_out:
                    raise ValueError(
                        f"{name}: masked LoRA supports nn.Linear layers (fan_in_fan_out=False) only"
                    )
                yield module, keep


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    linear = sorted(
        {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    )
    missing = [t for t in targets if t not in linear]
    if missing:
        listed = ", ".join(
            f"{t!r}" + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(t, linear, n=1))
            for t in missing
        )
        raise LoraTargetError(
            f"train.lora.target_modules names modules the model does not have: {listed}; "
            f"its linear modules are {', '.join(linear)}"
        )


def _masked_delta(layer: LoraLinear, adapter: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    compute = (
        torch.float32 if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    )
    delta = (b.to(compute) @ a.to(compute)) * layer.scaling[adapter]
    delta = torch.where(getattr(layer, _KEEP_BUFFER), delta, 0.0)
    return delta.to(dtype or a.dtype)


class _MaskedLowRank(torch.autograd.Function):
    """`x @ (keep * (B @ A) * scaling).T`, recomputing the dense masked update in backward instead of
    saving it (saving it would hold a dense copy of every adapted weight until the backward)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, scaling: float
    ):
        ctx.save_for_backward(x, a, b, keep)
        ctx.scaling = scaling
        delta = torch.where(keep, (b @ a) * scaling, 0.0)
        return nn.functional.linear(x, delta.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, a, b, keep = ctx.saved_tensors
        delta = torch.where(keep, (b @ a) * ctx.scaling, 0.0)
        grad_x = grad_y @ delta.to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        # d loss / d (B @ A): the masked outer product of output gradients and inputs over all tokens.
        grad_ba = grad_y.reshape(-1, grad_y.shape[-1]).t().to(a.dtype) @ x.reshape(-1, x.shape[-1]).to(
            a.dtype
        )
        grad_ba = torch.where(keep, grad_ba * ctx.scaling, 0.0)
        return grad_x, b.t() @ grad_ba, grad_ba @ a.t(), None, None


class MaskedLora(LoraVariant):
    """A peft LoRA variant whose update is `keep * (B @ A) * scaling`, in the forward pass and in merges.

    The keep mask is a non-persistent buffer of the LoRA layer (moved with the model, not saved with
    adapter checkpoints: the run's masks are its source). peft calls these methods for the adapters
    listed in the layer's `lora_variant`.
    """

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to initialise: the mask is attached by `restrict_to_masks`."""

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + _masked_delta(module, active_adapter, orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += _masked_delta(module, active_adapter, orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - _masked_delta(module, active_adapter, orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        dropped = module.lora_dropout[active_adapter](x)
        update = _MaskedLowRank.apply(
            dropped,
            module.lora_A[active_adapter].weight,
            module.lora_B[active_adapter].weight,
            getattr(module, _KEEP_BUFFER),
            module.scaling[active_adapter],
        )
        return result + update.to(result.dtype)
