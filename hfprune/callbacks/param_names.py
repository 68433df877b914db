"""Parameter names as the plain model spells them, through training wrappers and PEFT adapters.

`SparsityMaskCallback` keys its masks by the plain model's parameter names; these helpers find those
parameters in a wrapped model (DDP, FSDP1, activation checkpointing, `torch.compile`) or an adapted one
(PEFT: `base_model.model.` prefix, `.base_layer.` infix), and tell adapter parameters apart, without
importing peft.
"""

import difflib
from collections.abc import Iterable, Mapping

from torch import nn


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
