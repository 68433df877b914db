"""The pruner registry: the methods a recipe may name, and the `Pruner` class behind each.

`METHODS` is the manifest: per method its granularity, whether it needs calibration, a one-line
description, its options schema (`options.py`, no torch) and where its class lives. Listing the methods
and validating a recipe's `prune` section read only the manifest, so they import neither torch nor
transformers; `get_pruner` imports a method's module when a pruner is really wanted. A test holds the
manifest against the classes (`tests/pruners/test_registry.py`). Unknown names fail with a did-you-mean.

Adding a method: a `Pruner` subclass in a module here (`depth.py`, `width.py`, `sparse/methods.py` or a new
one), its options schema in `options.py`, and one `Method` row below.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hfprune.errors import InvalidInput
from hfprune.pruners.options import (
    CalibratedSparseOptions,
    FlapOptions,
    Granularity,
    MinitronDepthOptions,
    MinitronWidthOptions,
    PrunerOptions,
    SparseGPTOptions,
    SparseOptions,
)


if TYPE_CHECKING:
    from hfprune.pruners.base import Pruner


@dataclass(frozen=True)
class Method:
    """One registered pruning method, described without importing its implementation."""

    name: str
    granularity: Granularity
    needs_calibration: bool
    description: str
    options: type[PrunerOptions]
    implementation: str  # "module:Class" under hfprune.pruners

    def load(self) -> type[Pruner]:
        module, cls = self.implementation.split(":")
        return getattr(importlib.import_module(f"hfprune.pruners.{module}"), cls)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "shortgpt",
            Granularity.DEPTH,
            True,
            "Block Influence (1 - cos(h_in, h_out)); removes the least influential layers",
            PrunerOptions,
            "depth:ShortGPTPruner",
        ),
        Method(
            "minitron_depth",
            Granularity.DEPTH,
            True,
            "contiguous block of layers whose removal changes calibration perplexity least",
            MinitronDepthOptions,
            "depth:MinitronDepthPruner",
        ),
        Method(
            "minitron_width",
            Granularity.WIDTH,
            True,
            "hidden channels by norm-output activation, FFN neurons by down_proj-input activation",
            MinitronWidthOptions,
            "width:MinitronWidthPruner",
        ),
        Method(
            "flap",
            Granularity.WIDTH,
            True,
            "fluctuation (input variance x squared weight column norm) per KV group and FFN neuron",
            FlapOptions,
            "width:FlapPruner",
        ),
        Method(
            "wanda",
            Granularity.SPARSE,
            True,
            "|W| x input-feature L2 norm, compared within each output row; no weight update",
            CalibratedSparseOptions,
            "sparse.methods:WandaPruner",
        ),
        Method(
            "sparsegpt",
            Granularity.SPARSE,
            True,
            "OBS saliency from the calibration Hessian, blocked, with updates of surviving weights",
            SparseGPTOptions,
            "sparse.methods:SparseGPTPruner",
        ),
        Method(
            "magnitude",
            Granularity.SPARSE,
            False,
            "|W| with one threshold per matrix; no calibration",
            SparseOptions,
            "sparse.methods:MagnitudePruner",
        ),
    )
}


class UnknownPrunerError(InvalidInput, KeyError):
    """Raised for a method name that is not in the registry; the message suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_method(name: str) -> Method:
    """The registered method `name`; an unknown name raises `UnknownPrunerError` with suggestions."""
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), METHODS, n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownPrunerError(
            f"unknown method {name!r}; {hint}known methods: {', '.join(sorted(METHODS))}"
        ) from None


def get_pruner(name: str) -> type[Pruner]:
    """The `Pruner` class of method `name` (its module imported now); unknown names as `get_method`."""
    return get_method(name).load()


def build_pruner(name: str, options: dict[str, Any] | None = None) -> Pruner:
    """The pruner a recipe's `prune: {method: name, options: ...}` asks for: the one place hfprune
    builds a pruner (the prune stage, the plan and the dry run all come here)."""
    method = get_method(name)
    return method.load()(method.options(**(options or {})))
