"""Ratio-to-shape resolution for the structured pruners: (parent config, method, ratio) -> TargetShape.

Used by every structured pruner's `plan` (and so by `--dry-run`) before any weight is read. The ratio
is the fraction of non-embedding parameters removed. A shape is legal when the saved config loads with
the parent family's own config class and its `ArchitectureSpec` accepts it (`hfprune.architectures`):
some classes check `hidden_size % num_attention_heads == 0` on every load, even when `head_dim` is
written explicitly, which restricts hidden sizes and head counts; per-head norms fix `head_dim`; bias
compensation needs a bias the family can express. Parameter counts use the family's formula. When no
legal shape lands within the tolerance of the request, `ShapeError` says why and names the nearest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from transformers import PretrainedConfig

from hfprune.architectures.base import ArchitectureSpec, ParamCount
from hfprune.architectures.registry import architecture_of
from hfprune.models.structure import count_config_parameters, updated_config
from hfprune.pruners.base import ShapeError, TargetShape
from hfprune.pruners.options import RATIO_TOLERANCE


class ShapeSpace:
    """Parameter counts of candidate shapes of one parent, computed from a plain namespace.

    The resolver evaluates hundreds of candidates; building (and validating) a config object for each
    would dominate `--dry-run` time, so only the chosen shape is built as a real config.
    """

    def __init__(self, config: PretrainedConfig):
        self.config = config
        self.spec = architecture_of(config)
        # head_dim is written out so that candidates with another hidden size keep the parent's heads.
        self.base = {**config.to_dict(), "head_dim": self.spec.head_dim(config)}
        self.before = count_config_parameters(config)

    def count(self, changes: dict[str, Any]) -> ParamCount:
        return self.spec.count_parameters(SimpleNamespace(**{**self.base, **changes}))

    def ratio(self, changes: dict[str, Any]) -> float:
        return 1.0 - self.count(changes).non_embedding / self.before.non_embedding


def build_shape(config: PretrainedConfig, changes: dict[str, Any], ratio: float) -> TargetShape:
    """A `TargetShape` whose config changes are checked by constructing the real config class and
    by the family's own rule (`ArchitectureSpec.shape_problem`)."""
    new = updated_config(config, changes)
    problem = architecture_of(config).shape_problem(config, new)
    if problem:
        raise ShapeError(f"{changes} is not a legal shape: {problem}")
    return TargetShape(changes, count_config_parameters(config), count_config_parameters(new), ratio)


@dataclass(frozen=True)
class Candidate:
    """One legal shape: its config changes, the ratio it reaches and a preference key (lower wins)."""

    changes: dict[str, Any]
    ratio: float
    preference: tuple[float, ...]


def choose(
    space: ShapeSpace, ratio: float, candidates: Iterable[Candidate], tolerance: float, why: str
) -> TargetShape:
    """The preferred candidate within `tolerance` of `ratio`, or `ShapeError` naming the nearest one."""
    candidates = list(candidates)
    if not candidates:
        raise ShapeError(f"no legal shape exists for this parent: {why}")
    within = [c for c in candidates if abs(c.ratio - ratio) <= tolerance + 1e-12]
    if within:
        best = min(within, key=lambda c: (*c.preference, abs(c.ratio - ratio)))
        return build_shape(space.config, best.changes, ratio)
    nearest = min(candidates, key=lambda c: abs(c.ratio - ratio))
    raise ShapeError(
        f"ratio {ratio} cannot be reached within {tolerance}: {why}. The nearest legal shape is "
        f"{nearest.changes} at ratio {nearest.ratio:.4f}"
    )


def require_within(shape: TargetShape, tolerance: float, why: str) -> TargetShape:
    """`shape` itself when it is within `tolerance` of its requested ratio, else `ShapeError`."""
    if abs(shape.ratio_achieved - shape.ratio_requested) <= tolerance + 1e-12:
        return shape
    raise ShapeError(
        f"ratio {shape.ratio_requested} cannot be reached within {tolerance}: {why}. The nearest legal shape "
        f"is {shape.config_changes} at ratio {shape.ratio_achieved:.4f}"
    )


def ffn_choices(
    space: ShapeSpace, fixed: dict[str, Any], ratio: float, alignment: int, low: float, high: float
) -> list[int]:
    """FFN sizes (multiples of `alignment`, or the parent's own) in [low, high] nearest the ratio.

    With everything else fixed, the non-embedding count is linear in the FFN size, so the exact size
    that hits the ratio is solved for and its aligned neighbours are the only sizes worth trying.
    """
    parent_ffn = space.config.intermediate_size
    low, high = max(low, 1), min(high, parent_ffn)
    if low > high:
        return []
    target = space.before.non_embedding * (1.0 - ratio)
    base = space.count({**fixed, "intermediate_size": 0}).non_embedding
    slope = space.count({**fixed, "intermediate_size": 1}).non_embedding - base
    exact = min(max((target - base) / slope, low), high)
    options = {
        alignment * math.floor(exact / alignment),
        alignment * math.ceil(exact / alignment),
        parent_ffn,
    }
    return sorted(f for f in options if low <= f <= high and (f % alignment == 0 or f == parent_ffn))


def ideal_hidden(space: ShapeSpace, ratio: float, proportion: float) -> float:
    """The (continuous) hidden size reaching `ratio` with FFN = proportion x hidden, by bisection."""
    low, high = 0.0, float(space.config.hidden_size)
    for _ in range(50):
        mid = (low + high) / 2
        reached = space.ratio({"hidden_size": mid, "intermediate_size": proportion * mid})
        low, high = (mid, high) if reached > ratio else (low, mid)
    return (low + high) / 2


def width_candidates(
    space: ShapeSpace, ratio: float, alignment: int, proportion: float, slack: float
) -> Iterator[Candidate]:
    """Hidden sizes on the legal grid, each with its best FFN sizes inside the proportion band.

    Preference: the hidden size nearest the one that keeps the proportion exactly, then the FFN size
    whose proportion drifts least; the FFN size absorbs the rounding of the coarse hidden grid.
    """
    config = space.config
    step, _ = space.spec.hidden_step(config, alignment)
    ideal = ideal_hidden(space, ratio, proportion)
    for h in sorted({*range(step, config.hidden_size + 1, step), config.hidden_size}):
        fixed = {"hidden_size": h, "head_dim": space.spec.head_dim(config)}
        band = (proportion * h * (1 - slack), proportion * h * (1 + slack))
        for f in ffn_choices(space, fixed, ratio, alignment, *band):
            changes = {**fixed, "intermediate_size": f}
            drift = abs(math.log(f / h / proportion))
            yield Candidate(changes, space.ratio(changes), (abs(h - ideal), drift))


def plan_width(
    config: PretrainedConfig,
    ratio: float,
    *,
    alignment: int = 64,
    ffn_ratio: float | None = None,
    slack: float = 0.2,
    tolerance: float = RATIO_TOLERANCE,
) -> TargetShape:
    """Minitron-width shape: hidden and FFN sizes, heads kept, `head_dim` written explicitly."""
    space = ShapeSpace(config)
    _, grid = space.spec.hidden_step(config, alignment)
    proportion = ffn_ratio or config.intermediate_size / config.hidden_size
    why = (
        f"hidden_size must be a multiple of {grid} "
        f"and intermediate_size a multiple of {alignment} within {slack:.0%} of {proportion:.3f} x hidden_size; "
        "a smaller `alignment`, a larger `proportion_slack` or another `ffn_ratio` widens the choice"
    )

    def attempt(grid: int) -> TargetShape:
        return choose(space, ratio, width_candidates(space, ratio, grid, proportion, slack), tolerance, why)

    try:
        return attempt(alignment)
    except ShapeError as err:
        # Name the largest finer alignment that does reach the ratio, so the fix is one edit away.
        for finer in (alignment // 2**k for k in range(1, alignment.bit_length())):
            try:
                shape = attempt(finer)
            except ShapeError:
                continue
            hint = f"`alignment: {finer}` reaches {shape.ratio_achieved:.4f} with {shape.config_changes}"
            raise ShapeError(f"{err}; {hint}") from None
        raise


def legal_groups_removed(config: PretrainedConfig) -> list[int]:
    """KV-group counts that may be removed: at least one group stays, and, for families whose config
    checks it on load, the remaining query heads divide hidden_size."""
    spec = architecture_of(config)
    groups, per_group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    return [g for g in range(groups) if spec.heads_fit(config.hidden_size, (groups - g) * per_group)]


def plan_groups(
    config: PretrainedConfig,
    ratio: float,
    *,
    alignment: int = 64,
    groups_removed: int | None = None,
    compensate: frozenset[str] = frozenset(),
    tolerance: float = RATIO_TOLERANCE,
) -> TargetShape:
    """FLAP shape: whole KV groups removed from every layer, then FFN neurons to reach the ratio.

    The preferred group count removes the same fraction of attention as of the whole decoder (FLAP's
    uniform setting), rounding toward fewer groups on a tie; the FFN size absorbs the rest.
    `groups_removed` fixes the count instead. Bias compensation needs a bias on the block's output
    projection that the family's config can express.
    """
    spec = architecture_of(config)
    for block in sorted(compensate):
        if not spec.can_bias_output(block):
            raise ShapeError(
                f"bias compensation of the {block} block needs a bias on {spec.output_projection(block)}, which "
                f"a {spec.config_class} cannot express; use bias_compensation: none"
            )
    legal = legal_groups_removed(config)
    rule = (
        f"the remaining query heads must divide hidden_size {config.hidden_size} ({spec.config_class} check)"
        if spec.hidden_divisible_by_heads
        else "at least one group stays"
    )
    why = (
        f"{config.num_key_value_heads} KV groups of {config.num_attention_heads // config.num_key_value_heads} "
        f"query heads; {rule}, so the number of groups removed is one of {legal}; intermediate_size is a "
        f"multiple of {alignment}"
    )
    if groups_removed is not None:
        legal = [g for g in legal if g == groups_removed]
        why += f"; `kv_groups_removed` fixes it to {groups_removed}"
    space = ShapeSpace(config)
    return choose(space, ratio, group_candidates(space, ratio, legal, alignment, compensate), tolerance, why)


def bias_changes(
    spec: ArchitectureSpec, config: PretrainedConfig, compensate: frozenset[str], pruned: frozenset[str]
) -> dict[str, bool]:
    """The family's bias flags after FLAP: the parent's, plus the flag that biases a compensated
    block's output projection where that block lost something (`pruned`: "attention", "mlp")."""
    flags = {}
    for flag in spec.bias_flags:
        wanted = flag.block in (compensate & pruned) and spec.output_bias_flag(flag.block) == flag
        flags[flag.key] = bool(getattr(config, flag.key, False)) or wanted
    return flags


def group_candidates(
    space: ShapeSpace, ratio: float, legal: list[int], alignment: int, compensate: frozenset[str]
) -> Iterator[Candidate]:
    config, spec = space.config, space.spec
    groups, heads = config.num_key_value_heads, config.num_attention_heads
    for removed in legal:
        kept = groups - removed
        attention = frozenset({"attention"} if removed > 0 else ())
        fixed = {
            "num_attention_heads": kept * heads // groups,
            "num_key_value_heads": kept,
            "head_dim": spec.head_dim(config),
            **bias_changes(spec, config, compensate, attention | {"mlp"}),
        }
        for f in ffn_choices(space, fixed, ratio, alignment, alignment, config.intermediate_size):
            # A bias only where something was removed: compensating nothing would only add parameters.
            mlp = frozenset({"mlp"} if f != config.intermediate_size else ())
            changes = {
                **fixed,
                "intermediate_size": f,
                **bias_changes(spec, config, compensate, attention | mlp),
            }
            # Ties go to removing fewer groups: the study's FLAP model kept more of its attention than of its MLP.
            yield Candidate(changes, space.ratio(changes), (abs(removed - ratio * groups), removed))
