"""Where a model computes: the accelerator when there is one, the parent's whole life before training.

Sits between loading (`hub.load_parent`, a recipe's `parent.device`) and every stage that runs a model
before training: parent evaluation, calibration, pruning, and the evaluation of the pruned and trained
models. `resolve_device` turns `parent.device` (auto | cpu | cuda | cuda:N | N) into a `torch.device`;
`place` puts a model there and logs the device and dtype.

A parent whose weights do not fit the device is *offloaded* (the way llm-compressor calibrates large
models): its decoder layers stay in host memory and each is brought onto the device when it runs (a
forward pre-hook) and sent back afterwards, while the embeddings, the final norm and the LM head live
on the device. Every forward pass (evaluation, the streaming calibration passes) then works unchanged;
the sequential sparse walk pins one layer on the device for its whole step (`onloaded`). This costs one
host-to-device copy of the decoder's weights per forward pass, and keeps the surgery on host weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfprune.errors import InvalidInput, RunFailure
from hfprune.models.structure import decoder_layers
from hfprune.recipe.device import CUDA_SPEC, device_spec_problem


logger = logging.getLogger(__name__)

DeviceSpec = str | int
HOST = torch.device("cpu")
_CUDA = CUDA_SPEC
# Device memory left free beside the weights for activations, the calibration statistics and logits.
HEADROOM_BYTES = 2 * 2**30
HEADROOM_FRACTION = 0.1


class DeviceError(InvalidInput, ValueError):
    """`parent.device` names a device this machine does not have, or is not a device at all."""


class PlacementError(RunFailure, RuntimeError):
    """A model cannot be placed as asked (its weights were never loaded: they are on `meta`)."""


def _local_rank() -> int:
    """The GPU of this process under torchrun (each rank computes on its own), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: DeviceSpec = "auto") -> torch.device:
    """The device `parent.device` asks for on this machine; `DeviceError` when it has no such device.

    auto: the CUDA device of this process (LOCAL_RANK under torchrun) when CUDA is available, else cpu.
    "meta" (shapes without weights) is accepted here for plans and tests, not in recipes.
    """
    problem = None if spec == "meta" else device_spec_problem(spec)
    if problem:
        raise DeviceError(f"parent.device {problem}")
    if spec in ("cpu", "meta"):
        return torch.device(spec)
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", _local_rank()) if available else HOST
    if isinstance(spec, int):
        index: int | None = spec
    else:
        match = _CUDA.match(spec)
        index = int(match.group(2)) if match and match.group(2) is not None else None
    if not available:
        raise DeviceError(f"parent.device {spec!r} asks for CUDA, but this machine has none; use auto or cpu")
    count = torch.cuda.device_count()
    index = _local_rank() if index is None else index
    if index >= count:
        raise DeviceError(
            f"parent.device {spec!r}: this machine has {count} CUDA device(s), indices 0 to {count - 1}"
        )
    return torch.device("cuda", index)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once (tied weights once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def free_bytes(device: torch.device) -> int | None:
    """Free memory on an accelerator (None for the host and `meta`, where nothing is measured)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def fits(weights: int, free: int | None) -> bool:
    """Whether weights of this size fit beside the headroom that calibration and evaluation need."""
    if free is None:
        return True
    return weights <= free - max(HEADROOM_BYTES, int(HEADROOM_FRACTION * free))


@dataclass(frozen=True)
class Placement:
    """Where a model was put: the device it computes on, and whether its decoder layers are offloaded."""

    device: torch.device
    dtype: torch.dtype
    offloaded: bool
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "offloaded_layers": self.offloaded,
            "weight_bytes": self.weight_bytes,
        }


def place(model: nn.Module, device: torch.device, stage: str = "model", free: int | None = None) -> Placement:
    """Put `model` on `device` whole, or offloaded when its weights do not fit there; log where.

    `free` overrides the measured free memory of the device (tests, plans). Earlier offloading hooks
    are removed first, so a pruned model that now fits is moved whole.
    """
    _require_loaded(model, device, stage)
    remove_offload(model)
    size = weight_bytes(model)
    free = free_bytes(device) if free is None else free
    whole = fits(size, free)
    if whole:
        model.to(device)
    else:
        _offload(model, device)
    placement = Placement(device, _dtype(model), not whole, size)
    _log(stage, placement, free)
    return placement


def describe(model: nn.Module) -> str:
    """'cuda:0, bfloat16' (with ', decoder layers offloaded to cpu' when they are): for stage logs."""
    layers = _decoder_layers_or_none(model)
    offloaded = layers is not None and any(_offload_state(layer) for layer in layers)
    device = _execution_device(model)
    tail = ", decoder layers offloaded to cpu" if offloaded else ""
    return f"{device}, {str(_dtype(model)).removeprefix('torch.')}{tail}"


def log_stage(stage: str, model: nn.Module) -> None:
    """One log line naming the device and dtype a stage runs `model` on."""
    logger.info("%s runs on %s", stage, describe(model))


def _log(stage: str, placement: Placement, free: int | None) -> None:
    gib, dtype = placement.weight_bytes / 2**30, str(placement.dtype).removeprefix("torch.")
    if placement.offloaded:
        logger.info(
            "%s: %.2f GiB of %s weights do not fit %s (%.2f GiB free); decoder layers stay on the host "
            "and are brought to %s one at a time, embeddings and LM head live there",
            stage, gib, dtype, placement.device, (free or 0) / 2**30, placement.device,
        )  # fmt: skip
    else:
        logger.info("%s: on %s in %s (%.2f GiB of weights)", stage, placement.device, dtype, gib)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _execution_device(model: nn.Module) -> torch.device:
    embeddings = getattr(model, "get_input_embeddings", None)
    module = embeddings() if embeddings is not None else None
    return (module.weight if module is not None else next(model.parameters())).device


def _require_loaded(model: nn.Module, device: torch.device, stage: str) -> None:
    if device.type != "meta" and any(p.is_meta for p in model.parameters()):
        raise PlacementError(
            f"{stage}: its weights are on the meta device (never loaded), so it cannot be placed on {device}; "
            "load the weights first (from_pretrained) or keep it on meta for shape-only work"
        )


def _decoder_layers_or_none(model: nn.Module) -> nn.ModuleList | None:
    try:
        return decoder_layers(model)
    except (AttributeError, ValueError):
        return None


# -- offloading -------------------------------------------------------------------------------------
# The attribute of an offloaded layer that holds its `_Offload`. It lives on the layer (not in a table
# beside the model) so that a deep copy of an offloaded model, such as a distillation teacher cast to
# the training dtype, carries its own hooks and state together.
_STATE = "_hfprune_offload"


class _Offload:
    """The pair of hooks of one offloaded decoder layer; `pinned` keeps it on the device between calls."""

    def __init__(self, layer: nn.Module, device: torch.device, home: torch.device) -> None:
        self.device, self.home, self.pinned = device, home, False
        self.handles = (layer.register_forward_pre_hook(self.before), layer.register_forward_hook(self.after))

    def before(self, module: nn.Module, _args: tuple) -> None:
        if not self.pinned:
            move(module, self.device)

    def after(self, module: nn.Module, _args: tuple, _output: Any) -> None:
        if not self.pinned:
            move(module, self.home)


def move(module: nn.Module, device: torch.device) -> None:
    """Move one module's weights (its own and its children's) in place; the single place that does."""
    module.to(device)


def _offload(model: nn.Module, device: torch.device) -> None:
    """Everything but the decoder layers onto `device`; the layers to the host with onloading hooks."""
    from hfprune.architectures.registry import architecture_of

    spec = architecture_of(model.config)
    layers = spec.decoder_layers(model)
    spec.set_decoder_layers(model, nn.ModuleList())
    try:
        model.to(device)
    finally:
        spec.set_decoder_layers(model, layers)
    for layer in layers:
        layer.to(HOST)
        setattr(layer, _STATE, _Offload(layer, device, HOST))


def _offload_state(module: nn.Module) -> _Offload | None:
    return getattr(module, _STATE, None)


def remove_offload(model: nn.Module) -> None:
    """Take the onloading hooks off every layer (before training, or before placing the model again)."""
    for module in model.modules():
        state = _offload_state(module)
        if state is not None:
            for handle in state.handles:
                handle.remove()
            delattr(module, _STATE)


@contextlib.contextmanager
def onloaded(layer: nn.Module) -> Iterator[None]:
    """Keep an offloaded layer on its device for the whole block (a no-op for a layer that is not)."""
    state = _offload_state(layer)
    if state is None or state.pinned:
        yield
        return
    move(layer, state.device)
    state.pinned = True
    try:
        yield
    finally:
        state.pinned = False
        move(layer, state.home)
