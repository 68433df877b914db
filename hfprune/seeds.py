"""Seed streams: one independent seed per role, derived from the recipe's `seed`.

Every random choice of a run belongs to a role: the initialisation of a parent hfprune pretrains itself,
the initialisation of the random-init twins, LoRA adapters, the sweep's control (the parent's shape
trained again from another initialisation), and the order in which documents are read.
With one seed for all of them, a twin initialised from the recipe seed is byte-identical to the initial
weights of a parent pretrained from the same seed, and the comparison "pruned vs random init" would then
compare a model with its own starting point. `role_seed(seed, role)` gives each role its own stream.

The data order keeps the recipe seed itself, so runs made before the streams existed read the same
tokens in the same order; every other role is a hash of the recipe seed and the role's name.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum


class Role(StrEnum):
    """What a seed is for."""

    DATA_ORDER = "data_order"  # document shuffle and the Trainer's sampler seeds
    PARENT_INIT = "parent_init"  # the random weights a pretrained-here parent starts from
    TWIN_INIT = "twin_init"  # the random-init (scratch) twins
    ADAPTER_INIT = "adapter_init"  # LoRA adapters
    CONTROL_INIT = "control_init"  # the sweep's control: the parent's shape from another initialisation


def role_seed(seed: int, role: Role) -> int:
    """The seed of `role` for a recipe seeded with `seed` (a non-negative 31-bit integer).

    >>> role_seed(0, Role.DATA_ORDER)
    0
    >>> role_seed(0, Role.TWIN_INIT) != role_seed(0, Role.PARENT_INIT)
    True
    """
    if role is Role.DATA_ORDER:
        return seed
    digest = hashlib.sha256(f"hfprune:{seed}:{role.value}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
