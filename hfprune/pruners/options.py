"""What a recipe may say to a pruner: each method's `Options` schema and the ratios its options allow.

This module is the pruners' half that needs no torch: the registry (`hfprune.pruners`) lists every
method with its granularity and its options schema from here, so listing the methods and validating a
recipe's `prune` section import neither torch nor transformers. The pruner classes (`depth.py`,
`width.py`, `sparse/methods.py`) take their `Options` from here and never see the recipe itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


# How far the achieved ratio of a depth or width pruner may sit from the requested one.
RATIO_TOLERANCE = 0.03

# Default budget of calibration activations the sequential walk holds in memory: 4 GiB holds the
# literature's 128 x 2048 tokens of an 8B model in bf16 (2 GiB); the rest of a larger set is spilled.
DEFAULT_ACTIVATION_BYTES = 4 * 2**30


class Granularity(StrEnum):
    DEPTH = "depth"
    WIDTH = "width"
    SPARSE = "sparse"


class PrunerOptions(BaseModel):
    """Base of each pruner's `Options` schema: strict, immutable, validated from `prune.options`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def problems(cls, raw: dict[str, Any]) -> list[tuple[str, str]]:
        """(key path under `options`, message) for every invalid option."""
        try:
            cls.model_validate(raw)
        except ValidationError as err:
            return [
                (
                    ".".join(["options", *map(str, e["loc"])]),
                    "unknown option" if e["type"] == "extra_forbidden" else e["msg"],
                )
                for e in err.errors()
            ]
        return []

    def ratio_problem(self, ratio: float) -> str | None:
        """A message when a pruner with these options cannot reach `ratio` (None when it can)."""
        return None


@dataclass(frozen=True)
class Pattern:
    """Unstructured, or N:M (keep N of every M consecutive weights along the input dimension)."""

    keep: int = 0
    group: int = 0

    @classmethod
    def parse(cls, text: str) -> Pattern:
        if text == "unstructured":
            return cls()
        keep, _, group = text.partition(":")
        return cls(int(keep), int(group))

    @property
    def is_nm(self) -> bool:
        return self.group > 0

    @property
    def ratio(self) -> float:
        """The only sparsity an N:M pattern reaches."""
        return (self.group - self.keep) / self.group

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}" if self.is_nm else "unstructured"


class MinitronDepthOptions(PrunerOptions):
    metric: Literal["perplexity"] = Field(
        "perplexity", description="what a candidate block is judged by (calibration perplexity)"
    )
    ratio_tolerance: float = Field(RATIO_TOLERANCE, gt=0, lt=1)


class MinitronWidthOptions(PrunerOptions):
    alignment: int = Field(64, ge=1, description="hidden and FFN sizes are multiples of this")
    ffn_ratio: float | None = Field(
        None, gt=0, description="FFN/hidden of the result (default: the parent's)"
    )
    proportion_slack: float = Field(
        0.2, ge=0, lt=1, description="allowed relative drift of FFN/hidden from its target"
    )
    ratio_tolerance: float = Field(RATIO_TOLERANCE, gt=0, lt=1)


class FlapOptions(PrunerOptions):
    alignment: int = Field(64, ge=1, description="the FFN size is a multiple of this")
    kv_groups_removed: int | None = Field(None, ge=0, description="fix how many KV groups each layer loses")
    bias_compensation: Literal["none", "attention", "mlp", "both"] = "none"
    ratio_tolerance: float = Field(RATIO_TOLERANCE, gt=0, lt=1)


class SparseOptions(PrunerOptions):
    pattern: Literal["unstructured", "2:4", "4:8"] = Field(
        default="unstructured", description="unstructured, or N:M (keep N of every M inputs; ratio 0.5 only)"
    )

    def ratio_problem(self, ratio: float) -> str | None:
        pattern = Pattern.parse(self.pattern)
        if pattern.is_nm and ratio != 0 and not math.isclose(ratio, pattern.ratio):
            return (
                f"pattern {pattern} keeps {pattern.keep} of every {pattern.group} weights, so it needs ratio "
                f"{pattern.ratio:g}, got {ratio:g}; use pattern: unstructured for other ratios"
            )
        return None


class CalibratedSparseOptions(SparseOptions):
    max_activation_bytes: int = Field(
        default=DEFAULT_ACTIVATION_BYTES,
        ge=0,
        description="calibration hidden states held in memory by the sequential walk; the rest go to files",
    )


class SparseGPTOptions(CalibratedSparseOptions):
    block_size: int = Field(default=128, gt=0, description="columns pruned together (mask chosen per block)")
    dampening: float = Field(default=0.01, gt=0, description="added to the Hessian diagonal, x its mean")

    @model_validator(mode="after")
    def _block_holds_whole_groups(self) -> SparseGPTOptions:
        group = Pattern.parse(self.pattern).group
        if group and self.block_size % group:
            raise ValueError(
                f"block_size {self.block_size} must be a multiple of {group} for pattern {self.pattern}"
            )
        return self
