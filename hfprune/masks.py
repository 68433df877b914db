"""Sparsity masks: the compact file saved beside a sparse pruned checkpoint, and reports about them.

Sparse pruners (`wanda`, `sparsegpt`, `magnitude`) return keep-masks in `PruneResult.masks`; the prune
stage writes them with `save_masks` to `models/pruned/sparsity_masks.safetensors`, and training (the
`SparsityMaskCallback`) and the random-init twin read them back with `load_masks`, so all three use
exactly the same zero pattern. Keys are parameter names as in `model.named_parameters()` (e.g.
`model.layers.0.mlp.up_proj.weight`); values are bool tensors of the parameter's shape, True = keep.

File format: a safetensors file holding, per parameter, the mask flattened in row-major order and
bit-packed into uint8 (most significant bit first, the same as `numpy.packbits`), plus metadata
`format`, `version` and `shapes` (JSON: name -> shape). One bit per weight: 1/8 of a bool tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hfprune.architectures import architecture_of


FORMAT = "hfprune.sparsity_masks"
VERSION = "1"
# Bit weights for packing 8 keep-flags into one byte, first flag in the most significant bit.
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
_NM_PATTERNS = ((2, 4), (4, 8))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor flattened row-major into uint8 bytes, 8 flags per byte, zero-padded at the end."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """The inverse of `pack_bits`: a bool tensor of `shape`."""
    shape = tuple(int(size) for size in shape)
    bits = (packed.reshape(-1, 1) >> _SHIFTS) & 1
    return bits.reshape(-1)[: _numel(shape)].bool().reshape(shape)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write keep-masks (parameter name -> bool tensor) bit-packed to a safetensors file."""
    tensors, shapes = {}, {}
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask for {name!r} must be a bool tensor (True = keep)")
        tensors[name] = pack_bits(mask)
        shapes[name] = list(mask.shape)
    path = Path(path)
    metadata = {"format": FORMAT, "version": VERSION, "shapes": json.dumps(shapes)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by `save_masks`: parameter name -> bool tensor (True = keep), on the CPU."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a sparsity-mask file (metadata format is {metadata.get('format')!r})"
            )
        if metadata.get("version") != VERSION:
            raise ValueError(f"{path}: mask file version {metadata.get('version')!r}, expected {VERSION!r}")
        shapes = json.loads(metadata["shapes"])
        masks = {}
        for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
            packed = handle.get_tensor(name)
            shape = shapes[name]
            if packed.numel() != -(-_numel(shape) // 8):
                raise ValueError(f"{path}: {name} holds {packed.numel()} bytes, not enough for shape {shape}")
            masks[name] = unpack_bits(packed, shape)
    return masks


def masks_from_zeros(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks from the exact zeros of the named weights (default: the projection weights of every
    decoder layer that the family's spec lists, the matrices sparse pruners target), on the CPU."""
    params = dict(model.named_parameters())
    if names is None:
        spec = architecture_of(model.config)
        layers = spec.decoder_layers(model)
        targets = {id(layer.get_submodule(name).weight) for layer in layers for name in spec.linears}
        names = [name for name, param in params.items() if id(param) in targets]
    masks = {}
    for name in names:
        if name not in params:
            raise KeyError(f"no parameter named {name!r} in {type(model).__name__}")
        masks[name] = (params[name].detach() != 0).cpu()
    return masks


def mask_pattern(keep: torch.Tensor) -> str:
    """`dense`, `2:4` / `4:8` (at most N kept in every M consecutive inputs of a row) or `unstructured`."""
    if bool(keep.all()):
        return "dense"
    for n, m in _NM_PATTERNS:
        if (
            keep.dim() == 2
            and keep.shape[1] % m == 0
            and bool((keep.reshape(-1, m).count_nonzero(dim=1) <= n).all())
        ):
            return f"{n}:{m}"
    return "unstructured"


def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Overall and per-module sparsity and pattern of `masks`, and how many masked weights of `model`
    are not zero (0 for a correctly pruned model). Per-module keys are module names."""
    params = dict(model.named_parameters())
    modules: dict[str, dict[str, Any]] = {}
    pruned = total = masked_nonzero = 0
    for name, keep in masks.items():
        weight = params[name].detach()
        dropped = keep.numel() - int(keep.count_nonzero())
        pruned, total = pruned + dropped, total + keep.numel()
        masked_nonzero += int((weight.ne(0) & ~keep.to(weight.device)).count_nonzero())
        modules[name.removesuffix(".weight")] = {
            "sparsity": round(dropped / keep.numel(), 6),
            "pattern": mask_pattern(keep),
        }
    patterns = {entry["pattern"] for entry in modules.values()}
    return {
        "pattern": patterns.pop() if len(patterns) == 1 else "mixed",
        "sparsity": round(pruned / total, 6) if total else 0.0,
        "pruned_weights": pruned,
        "masked_weights_total": total,
        "masked_nonzero": masked_nonzero,
        "modules": modules,
    }


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count
