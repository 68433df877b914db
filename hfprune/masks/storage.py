"""Sparsity masks: the compact file saved beside a sparse pruned checkpoint, and reports about them.

Sparse pruners (`wanda`, `sparsegpt`, `magnitude`) return keep-masks in `PruneResult.masks`; the prune
stage writes them with `save_masks` to `models/pruned/sparsity_masks.safetensors`, and training (the
`SparsityMaskCallback`) and the random-init twin read them back with `load_masks`, so all three use
exactly the same zero pattern. Keys are parameter names as in `model.named_parameters()` (e.g.
`model.layers.0.mlp.up_proj.weight`); values are bool tensors of the parameter's shape, True = keep.

File format: a safetensors file holding, per parameter, the mask flattened in row-major order and
bit-packed into uint8 (most significant bit first, the same as `numpy.packbits`), plus metadata
`format`, `version` and `shapes` (JSON: name -> shape). One bit per weight: 1/8 of a bool tensor.

Training at scale keeps them that way: `load_packed_masks` returns `PackedMask`s
(`hfprune.masks.packed`, one bit per weight in host memory), optionally only the names asked for and
only the rows of one FSDP shard, read from the file without the rest. `SparsityMaskCallback` and the
twin accept them wherever they accept a bool mask and unpack one parameter at a time, straight to the
int8 keep bits the callback applies.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hfprune.architectures.registry import architecture_of
from hfprune.masks.packed import (
    PackedMask,
    numel,
    pack_bits,
    row_count,
    shard_rows,
)


FORMAT = "hfprune.sparsity_masks"
VERSION = "1"
_NM_PATTERNS = ((2, 4), (4, 8))


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


def load_masks(path: str | Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by `save_masks`: parameter name -> bool tensor (True = keep), on the CPU.

    `names` restricts the result to those parameters (every one must be in the file); None reads all.
    """
    return {name: mask.unpack() for name, mask in load_packed_masks(path, names).items()}


def load_packed_masks(
    path: str | Path, names: Iterable[str] | None = None, *, shard: tuple[int, int] | None = None
) -> dict[str, PackedMask]:
    """Read a file written by `save_masks` without unpacking it: parameter name -> `PackedMask`.

    Args:
        path: The mask file.
        names: Only these parameters (every one must be in the file); None reads all.
        shard: `(index, count)`: only the rows of dim 0 that FSDP2 process `index` of `count` holds
            (`shard_rows`), read from the file without the others. None reads every row.
    """
    with _open_mask_file(path) as (handle, shapes):
        wanted = list(shapes) if names is None else list(names)
        unknown = [name for name in wanted if name not in shapes]
        if unknown:
            raise KeyError(f"{path}: no mask for {', '.join(map(repr, unknown))}")
        return {name: _read_rows(handle, path, name, shapes[name], shard) for name in wanted}


def _read_rows(
    handle: Any, path: str | Path, name: str, shape: list[int], shard: tuple[int, int] | None
) -> PackedMask:
    """One mask's rows (all, or a shard's), reading only the bytes that hold them."""
    shape_t = tuple(int(size) for size in shape)
    rows = (0, row_count(shape_t)) if shard is None else shard_rows(row_count(shape_t), *shard)
    per_row = numel(shape_t[1:])
    first, stop = rows[0] * per_row, rows[1] * per_row
    packed = handle.get_slice(name)
    held = packed.get_shape()
    if held != [-(-numel(shape_t) // 8)]:
        raise ValueError(
            f"{path}: {name} holds {held} bytes, not the {-(-numel(shape_t) // 8)} of shape {shape}"
        )
    bits = packed[first // 8 : -(-stop // 8)]
    return PackedMask(bits, shape_t, rows, first % 8)


@contextmanager
def _open_mask_file(path: str | Path) -> Iterator[tuple[Any, dict[str, list[int]]]]:
    """The open file and its shapes, after checking that it is a mask file of this version."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a sparsity-mask file (metadata format is {metadata.get('format')!r})"
            )
        if metadata.get("version") != VERSION:
            raise ValueError(f"{path}: mask file version {metadata.get('version')!r}, expected {VERSION!r}")
        yield handle, json.loads(metadata["shapes"])


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
