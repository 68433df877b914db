"""Keep-masks in their compact in-memory form: bit-packed, whole or one FSDP2 shard's rows.

The mask file (`hfprune.masks.storage`) stores one bit per weight; at 8B parameters the masks of a sparse model
unpacked to bool take 6.5 GiB per process. Training keeps them packed instead: a `PackedMask` holds the
bits of a parameter's mask (or of the rows of dim 0 that one FSDP2 process holds, `shard_rows`), and
`SparsityMaskCallback` turns one parameter at a time into the int8 keep bits it applies on the
parameter's device (`local_keep_bits`), unpacking only the bytes of this process's rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


# Bit weights for packing 8 keep-flags into one byte, first flag in the most significant bit.
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor flattened row-major into uint8 bytes, 8 flags per byte, zero-padded at the end."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """The inverse of `pack_bits`: a bool tensor of `shape`."""
    shape = tuple(int(size) for size in shape)
    return _flags(packed, 0, numel(shape)).bool().reshape(shape)


def _flags(packed: torch.Tensor, offset: int, count: int, device: Any = None) -> torch.Tensor:
    """Flags `offset` .. `offset + count` of packed bytes as uint8 0/1, unpacked on `device` (only the
    bytes holding them are moved and unpacked)."""
    first = offset // 8
    packed = packed[first : -(-(offset + count) // 8)]
    offset -= first * 8
    packed = packed.to(device) if device is not None else packed
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[offset : offset + count]


@dataclass(frozen=True, eq=False)
class PackedMask:
    """A keep-mask left bit-packed in host memory: rows `rows[0]` .. `rows[1]` (dim 0) of a mask of `shape`.

    `bits` holds those rows' flags in row-major order, most significant bit first, the first flag at
    bit `bit_offset` of `bits[0]` (a row range read from a file need not start on a byte). A mask of
    every row is what `PackedMask.of` makes and `load_packed_masks` returns without `shard`; a shard's
    rows are what one FSDP2 process holds of the parameter (`shard_rows`).
    """

    bits: torch.Tensor
    shape: tuple[int, ...]
    rows: tuple[int, int]
    bit_offset: int = 0

    @classmethod
    def of(cls, keep: torch.Tensor) -> PackedMask:
        """The packed form of a whole bool mask (True = keep)."""
        if keep.dtype != torch.bool:
            raise TypeError(f"a keep-mask is a bool tensor (True = keep), got {keep.dtype}")
        return cls(pack_bits(keep), tuple(keep.shape), (0, row_count(keep.shape)))

    @property
    def whole(self) -> bool:
        """Whether every row of the parameter is here."""
        return self.rows == (0, row_count(self.shape))

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def flags(self, rows: tuple[int, int] | None = None, device: Any = None) -> torch.Tensor:
        """Rows `rows` (default: all the parameter's) as uint8 0/1 of shape (rows, *shape[1:]), on `device`."""
        start, stop = rows if rows is not None else (0, row_count(self.shape))
        if not self.rows[0] <= start <= stop <= self.rows[1]:
            raise ValueError(
                f"this mask holds rows {self.rows[0]}..{self.rows[1]} of a parameter of shape {self.shape}, "
                f"not rows {start}..{stop}: load it whole (load_packed_masks without shard) or for this shard"
            )
        per_row = numel(self.shape[1:])
        first = self.bit_offset + (start - self.rows[0]) * per_row
        flags = _flags(self.bits, first, (stop - start) * per_row, device)
        return flags.reshape((stop - start, *self.shape[1:]) if self.shape else ())

    def unpack(self) -> torch.Tensor:
        """The whole mask as a bool tensor (every row must be here)."""
        return self.flags().bool()


KeepMask = torch.Tensor | PackedMask
"""A keep-mask as training accepts it: a bool tensor (True = keep) or a `PackedMask`."""


def int8_keep_bits(mask: KeepMask, rows: tuple[int, int] | None, device: Any) -> torch.Tensor:
    """Rows `rows` (None: all) of `mask` on `device` as int8 -1 (keep, every bit set) or 0 (drop): the
    form `SparsityMaskCallback` ANDs into weights and gradients."""
    if isinstance(mask, PackedMask):
        return mask.flags(rows, device).to(torch.int8).neg_()
    part = mask if rows is None else mask[rows[0] : rows[1]]
    return part.to(device, torch.int8).neg_()


def shard_rows(length: int, index: int, count: int) -> tuple[int, int]:
    """Rows of dim 0 that shard `index` of `count` holds: FSDP2's split (`torch.chunk`, trailing shards
    possibly empty)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    chunk = -(-length // count)
    start = min(index * chunk, length)
    return start, min(start + chunk, length)


def local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """The rows of dim 0 this process holds of `param`: all of them unless it is a DTensor; None when
    the DTensor is split along another dim too (or the parameter is 0-d)."""
    if param.dim() == 0:
        return None
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    local_shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    if tuple(local_shape[1:]) != tuple(param.shape[1:]):
        return None
    return offset[0], offset[0] + local_shape[0]


def local_keep_bits(mask: KeepMask, param: torch.Tensor, device: Any) -> torch.Tensor:
    """The int8 keep bits of the part of `param` this process holds (its local shard for a DTensor)."""
    rows = local_rows(param)
    if rows is not None:  # unsharded, or FSDP2's split of dim 0: only this process's rows
        return int8_keep_bits(mask, rows, device)
    # Split along other dims: the whole mask is cut locally, without a collective.
    whole = int8_keep_bits(mask, None, device)
    if not isinstance(param, DTensor):
        return whole
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()


def row_count(shape: Iterable[int]) -> int:
    """Rows of dim 0 (a 0-d mask counts as one row of one)."""
    shape = tuple(shape)
    return int(shape[0]) if shape else 1


def numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count
