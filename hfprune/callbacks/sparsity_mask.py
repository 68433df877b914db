"""Sparse masks kept through training: masked weights stay exactly zero while the rest train.

Sparse pruners (wanda, sparsegpt, magnitude) record a keep-mask per weight; the train stage passes those
masks to `SparsityMaskCallback` for both the continued run and the scratch twin. The paper zeroes the
gradients of pruned weights before each AdamW step; this callback does that and also re-applies the
mask after each step, so weight decay, bf16 rounding, restored optimizer moments or anything else that
nudges a pruned weight cannot bring it back.

Parameters are matched by name through DDP (`module.`), FSDP1 (`_fsdp_wrapped_module.`), activation
checkpointing (`_checkpoint_wrapped_module.`) and `torch.compile` (`_orig_mod.`) wrappers. FSDP2
parameters are DTensors: each rank applies the matching shard of the mask to its local shard.

PEFT models are understood without importing peft: `base_model.model.` prefixes and `.base_layer.`
infixes are mapped to the plain names, so the masks of the pruned model apply unchanged to its adapted
copy. Adapter parameters (`lora_A`, `lora_B`, ..., anything inside an adapted layer but outside its
`base_layer`) are never masked. A PEFT merge is outside training, so the callback cannot guard it:
peft's `merge_and_unload()` adds the dense `B @ A` to the pruned weights. Merge with
`hfprune.training.recovery.lora.merge_lora(model, masks)`, or wrap with `hfprune.training.recovery.lora.wrap_lora(model,
spec, masks=masks)` so the adapters only ever update kept weights; the callback warns when it sees
masked weights under adapters that are not restricted that way.
"""

import difflib
import logging
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hfprune.masks.packed import KeepMask, PackedMask, local_keep_bits


logger = logging.getLogger(__name__)


# -- parameter names as the plain model spells them, through wrappers and PEFT adapters ------------
# The masks are keyed by the plain model's parameter names; these find those parameters in a wrapped
# model (DDP, FSDP1, activation checkpointing, `torch.compile`) or an adapted one (PEFT:
# `base_model.model.` prefix, `.base_layer.` infix), and tell adapter parameters apart, without
# importing peft.
_WRAPPER_SEGMENTS = frozenset(
    {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_layer"}  # base_layer: PEFT
)
_PEFT_PREFIX = ("base_model", "model")  # PeftModel -> its tuner (LoraModel, ...) -> the plain model

MASKED_DELTA_ATTR = "hfprune_masked_delta"
"""Set (True) on a PEFT layer whose adapter update is restricted to the base weight's keep mask
(`hfprune.training.recovery.lora.restrict_to_masks`), so a merge keeps its pruned weights at zero."""


def canonical_name(name: str) -> str:
    """Parameter name as the plain model spells it: wrapper segments, leading `module.`, PEFT's leading
    `base_model.model.` and `.base_layer.` infixes removed."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    if len(parts) > 2 and tuple(parts[:2]) == _PEFT_PREFIX:
        parts = parts[2:]
    return ".".join(parts)


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT tuner layers by module name: the modules that wrap a `base_layer`."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(child == "base_layer" for child, _ in module.named_children())
    }


def adapter_layer_of(param_name: str, adapted: Mapping[str, nn.Module]) -> str | None:
    """The adapted layer `param_name` belongs to as an adapter parameter (inside the layer, outside its
    `base_layer`), or None for a base or plain parameter."""
    parts = param_name.split(".")
    for i in range(len(parts) - 1):
        prefix = ".".join(parts[:i])
        if prefix in adapted and parts[i] != "base_layer":
            return prefix
    return None


def resolve_names(mask_names: Iterable[str], param_names: Iterable[str]) -> dict[str, str]:
    """Map each mask name to the model's (possibly wrapped) parameter name; `param_names` holds no
    adapter parameters."""
    by_canonical: dict[str, str] = {}
    for name in param_names:
        by_canonical.setdefault(canonical_name(name), name)
    mapping, missing = {}, []
    for mask_name in mask_names:
        found = by_canonical.get(canonical_name(mask_name))
        if found is None:
            missing.append(mask_name)
        else:
            mapping[mask_name] = found
    if missing:
        hints = {m: difflib.get_close_matches(canonical_name(m), list(by_canonical), n=1) for m in missing}
        listed = ", ".join(
            f"{m!r}" + (f" (did you mean {hints[m][0]!r}?)" if hints[m] else "") for m in missing
        )
        raise KeyError(f"SparsityMaskCallback: masks name parameters the model does not have: {listed}")
    return mapping


# -- the callback -----------------------------------------------------------------------------------
def _masks_from_zeros(model: nn.Module, param_names: Iterable[str] | None) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    adapted = adapted_layers(model)
    if param_names is None:
        # lora_B starts at exactly zero: adapter weights are never taken for pruned ones.
        param_names = [
            f"{module_name}.weight"
            for module_name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and adapter_layer_of(f"{module_name}.weight", adapted) is None
            and bool((module.weight == 0).any())
        ]
    masks = {}
    for name in param_names:
        if name not in params:
            raise KeyError(f"no parameter named {name!r} in {type(model).__name__}")
        if adapter_layer_of(name, adapted) is not None:
            raise ValueError(f"{name} is a PEFT adapter parameter; adapters are never masked")
        if isinstance(params[name], DTensor):
            raise TypeError(f"{name} is sharded (DTensor); build masks from the unsharded model")
        masks[canonical_name(name)] = (params[name].detach() != 0).cpu()
    return masks


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # Under no_grad, DTensor.to_local() returns the shard's storage itself, so in-place ops reach it.
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


_BITS_BY_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _zero_dropped(tensor: torch.Tensor, keep_bits: torch.Tensor) -> None:
    """Set the dropped entries of `tensor` to +0.0 in place, bit-exactly.

    `keep_bits` is int8: -1 (all bits set) to keep, 0 to drop. ANDing the raw bits with it sign-extends
    -1 to every bit of the element, so kept values are untouched and dropped ones become +0.0 even when
    they held a NaN or an inf (a multiply by zero would keep those). It is one vectorised integer pass,
    about ten times faster than `masked_fill_` with a bool mask on CPU, at the same byte per weight.
    """
    tensor.view(_BITS_BY_SIZE[tensor.element_size()]).bitwise_and_(keep_bits)


class SparsityMaskCallback(TrainerCallback):
    """Keeps masked weights exactly zero during training with a `transformers.Trainer`.

    Before each optimizer step the masked gradient entries are zeroed; after it the masked weights are
    set to zero again. At the start of training the mask is applied once (pruned weights that are not
    zero yet become zero); at the end every masked weight is checked and a `RuntimeError` names any
    parameter where a masked weight is nonzero.

    With a plain `Trainer` the gradient norm used for clipping still includes the masked entries (the
    Trainer clips before calling back); `hfprune.trainer.PruneTrainer` zeroes them before clipping.
    Masks are copied to the parameters' device once and cached (one byte per weight) and applied by a
    bitwise AND on the raw bits, so a masked entry is exactly +0.0 even if it held a NaN or an inf.

    With a PEFT model (LoRA and the like), the plain names still apply (`q_proj.weight` finds
    `base_model.model....q_proj.base_layer.weight`) and adapter parameters are never masked, so the
    adapters train. A merge happens after training, out of the callback's reach: peft's
    `merge_and_unload()` writes the dense adapter update into pruned weights. Keep the sparsity with
    `hfprune.training.recovery.lora.merge_lora(model, masks)` (the callback logs a warning saying so).

    Masks may stay bit-packed (`hfprune.masks.packed.PackedMask`, from `load_packed_masks`): one bit per weight
    in host memory, unpacked one parameter at a time. Under FSDP2 a packed mask may hold only the rows
    of this process's shard (`load_packed_masks(..., shard=(rank, world))`); a process whose shard
    is not among the rows it was given raises `ValueError` when training starts.

    Args:
        masks: Parameter name as in `model.named_parameters()` of the unwrapped plain model (e.g.
            `"model.layers.0.mlp.up_proj.weight"`) -> bool tensor of the parameter's full shape,
            True = keep, or a `PackedMask` of that shape.

    Example:
        >>> from transformers import Trainer
        >>> from hfprune.callbacks import SparsityMaskCallback
        >>> masks = {"model.layers.0.mlp.up_proj.weight": keep}  # doctest: +SKIP
        >>> # or, from a pruned model's zeros: SparsityMaskCallback.from_zeros(model)
        >>> trainer = Trainer(model=model, args=args, train_dataset=train_data,
        ...                   callbacks=[SparsityMaskCallback(masks)])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, masks: Mapping[str, KeepMask]) -> None:
        if not masks:
            raise ValueError("SparsityMaskCallback needs at least one mask")
        for name, mask in masks.items():
            if not isinstance(mask, PackedMask) and (
                not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
            ):
                raise TypeError(
                    f"mask for {name!r} must be a bool tensor (True = keep) or a PackedMask, "
                    f"got {_describe(mask)}"
                )
        self.masks: dict[str, KeepMask] = dict(masks)
        # mask name -> this rank's keep mask as int8 bits (-1 keep, 0 drop) on the parameter's device
        self._keep_bits: dict[str, torch.Tensor] = {}
        self._names: dict[int, dict[str, str]] = {}  # id(model) -> mask name -> parameter name
        # Set by PruneTrainer when it already zeroed this step's masked gradients (before clipping).
        self.grads_zeroed_at_step: int | None = None

    @classmethod
    def from_zeros(cls, model: nn.Module, param_names: Iterable[str] | None = None) -> "SparsityMaskCallback":
        """Callback whose masks (True = keep) are the exact zeros of `model`, kept on the CPU.

        Args:
            model: An unwrapped, unsharded model whose pruned weights are exactly zero.
            param_names: Parameters to mask. By default, the weight of every `nn.Linear` holding at least
                one exact zero (a dense weight would only carry an all-True mask).
        """
        return cls(_masks_from_zeros(model, param_names))

    # ---- Trainer events ----

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = _require_model(kwargs)
        revived = sum(self.count_escaped(model).values())
        if revived:
            logger.info(
                "SparsityMaskCallback: zeroing %d masked weights that are nonzero at train start", revived
            )
        self.apply_to_weights(model)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        if self.grads_zeroed_at_step != state.global_step:  # a plain Trainer: nobody zeroed them yet
            self.zero_masked_grads(_require_model(kwargs))

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self.apply_to_weights(_require_model(kwargs))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.verify(_require_model(kwargs))

    # ---- Mask operations (usable without a Trainer, e.g. in a custom FSDP2 loop) ----

    @torch.no_grad()
    def zero_masked_grads(self, model: nn.Module) -> None:
        """Zero the gradient entries of masked weights (parameters without a gradient are skipped)."""
        for _, param, keep_bits in self._bound(model):
            if param.grad is not None:
                _zero_dropped(_local(param.grad), keep_bits)

    @torch.no_grad()
    def apply_to_weights(self, model: nn.Module) -> None:
        """Set every masked weight to exactly zero."""
        for _, param, keep_bits in self._bound(model):
            _zero_dropped(_local(param), keep_bits)

    @torch.no_grad()
    def count_escaped(self, model: nn.Module) -> dict[str, int]:
        """Masked weights that are nonzero, per mask name (this rank's shard only under FSDP2)."""
        counts = {}
        for name, param, keep_bits in self._bound(model):
            count = int(torch.count_nonzero(_local(param)[keep_bits == 0]))
            if count:
                counts[name] = count
        return counts

    def verify(self, model: nn.Module) -> None:
        """Raise `RuntimeError` if any masked weight is nonzero."""
        escaped = self.count_escaped(model)
        if escaped:
            listed = "; ".join(
                f"module {name.rpartition('.')[0]} ({name.rpartition('.')[2]}): {count}"
                for name, count in escaped.items()
            )
            raise RuntimeError(
                f"SparsityMaskCallback: {sum(escaped.values())} masked weights are nonzero after training "
                f"({listed}). Something outside the callback wrote to pruned weights after the last "
                "optimizer step."
            )

    # ---- Binding masks to the (possibly wrapped or sharded) parameters ----

    def _bound(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters(remove_duplicate=False))
        names = self._names.get(id(model))
        if names is None or any(param_name not in params for param_name in names.values()):
            names = self._names[id(model)] = self._resolve(model, params)
        for mask_name, param_name in names.items():
            param = params[param_name]
            yield mask_name, param, self._local_keep_bits(mask_name, param)

    def _resolve(self, model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, str]:
        adapted = adapted_layers(model)
        adapter_params = {name for name in params if adapter_layer_of(name, adapted) is not None}
        named_adapters = sorted(
            {canonical_name(m) for m in self.masks} & {canonical_name(name) for name in adapter_params}
        )
        if named_adapters:
            raise ValueError(
                f"SparsityMaskCallback: masks name PEFT adapter parameters ({', '.join(named_adapters)}); "
                "adapters are never masked: mask the base weight (e.g. '...q_proj.weight') instead"
            )
        names = resolve_names(self.masks, [name for name in params if name not in adapter_params])
        if adapted:
            _warn_dense_adapters(names.values(), adapted)
        return names

    def _local_keep_bits(self, name: str, param: torch.Tensor) -> torch.Tensor:
        local = _local(param)
        cached = self._keep_bits.get(name)
        if cached is not None and cached.shape == local.shape and cached.device == local.device:
            return cached
        mask = self.masks[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"mask for {name} has shape {tuple(mask.shape)} but the parameter has {tuple(param.shape)} "
                "(FSDP1 flattened parameters are not supported; use FSDP2)"
            )
        try:
            keep_bits = local_keep_bits(mask, param, local.device)
        except ValueError as error:  # a shard's rows, but not this process's
            raise ValueError(f"mask for {name}: {error}") from None
        self._keep_bits[name] = keep_bits
        return keep_bits


def _warn_dense_adapters(param_names: Iterable[str], adapted: Mapping[str, nn.Module]) -> None:
    """Warn when masked weights sit under adapters whose update is dense: a PEFT merge would fill them."""
    dense = [
        layer
        for name in param_names
        if (layer := name.rpartition(".base_layer.")[0]) in adapted
        and not getattr(adapted[layer], MASKED_DELTA_ATTR, False)
    ]
    if dense:
        logger.warning(
            "SparsityMaskCallback: %d masked weights sit under PEFT adapters (e.g. %s). Training keeps them zero "
            "(the base weights are frozen and adapters are never masked), but peft's merge_and_unload() adds "
            "the dense adapter update to them. To keep the sparsity through a merge, merge with "
            "hfprune.training.recovery.lora.merge_lora(model, masks), or train adapters restricted to the masks: "
            "hfprune.training.recovery.lora.wrap_lora(model, spec, masks=masks).",
            len(dense),
            dense[0],
        )


def _require_model(kwargs: Mapping[str, object]) -> nn.Module:
    model = kwargs.get("model")
    if not isinstance(model, nn.Module):
        raise TypeError("SparsityMaskCallback needs the Trainer to pass `model` to its callbacks")
    return model


def _describe(value: object) -> str:
    return f"tensor of dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
