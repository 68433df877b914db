"""Ratio-to-shape resolution for the structured pruners: (parent config, method, ratio) -> TargetShape.

Used by every structured pruner's `plan` (and so by `--dry-run`) before any weight is read. The ratio
is the fraction of non-embedding parameters removed. A shape is legal when the saved config loads with
plain `LlamaConfig`: transformers validates `hidden_size % num_attention_heads == 0` on every load, even
when `head_dim` is written explicitly, so hidden sizes and head counts are restricted accordingly. When
no legal shape lands within the tolerance of the request, `ShapeError` says why and names the nearest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from transformers import PretrainedConfig

from hfprune.modeling import ParamCount, count_config_parameters, updated_config
from hfprune.pruners.base import ShapeError, TargetShape


RATIO_TOLERANCE = 0.03


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class ShapeSpace:
    """Parameter counts of candidate shapes of one parent, computed from a plain namespace.

    The resolver evaluates hundreds of candidates; building (and validating) a config object for each
    would dominate `--dry-run` time, so only the chosen shape is built as a real config.
    """

    def __init__(self, config: PretrainedConfig):
        self.config = config
        self.base = config.to_dict()
        self.before = count_config_parameters(config)

    def count(self, changes: dict[str, Any]) -> ParamCount:
        return count_config_parameters(SimpleNamespace(**{**self.base, **changes}))

    def ratio(self, changes: dict[str, Any]) -> float:
        return 1.0 - self.count(changes).non_embedding / self.before.non_embedding


def build_shape(config: PretrainedConfig, changes: dict[str, Any], ratio: float) -> TargetShape:
    """A `TargetShape` whose config changes are checked by constructing the real config class."""
    after = count_config_parameters(updated_config(config, changes))
    return TargetShape(changes, count_config_parameters(config), after, ratio)


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
    step = math.lcm(alignment, config.num_attention_heads)
    ideal = ideal_hidden(space, ratio, proportion)
    for h in sorted({*range(step, config.hidden_size + 1, step), config.hidden_size}):
        fixed = {"hidden_size": h, "head_dim": head_dim(config)}
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
    step = math.lcm(alignment, config.num_attention_heads)
    proportion = ffn_ratio or config.intermediate_size / config.hidden_size
    why = (
        f"hidden_size must be a multiple of lcm(alignment {alignment}, num_attention_heads "
        f"{config.num_attention_heads}) = {step} (LlamaConfig requires hidden_size % num_attention_heads == 0) "
        f"and intermediate_size a multiple of {alignment} within {slack:.0%} of {proportion:.3f} x hidden_size; "
        "a smaller `alignment`, a larger `proportion_slack` or another `ffn_ratio` widens the choice"
    )
    space = ShapeSpace(config)

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
    """KV-group counts that may be removed: at least one group stays, and the remaining query heads
    divide hidden_size (LlamaConfig's load-time check)."""
    groups, per_group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    return [g for g in range(groups) if config.hidden_size % ((groups - g) * per_group) == 0]


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
    `groups_removed` fixes the count instead.
    """
    legal = legal_groups_removed(config)
    why = (
        f"{config.num_key_value_heads} KV groups of {config.num_attention_heads // config.num_key_value_heads} "
        f"query heads; the remaining query heads must divide hidden_size {config.hidden_size} (LlamaConfig "
        f"check), so the number of groups removed is one of {legal}; intermediate_size is a multiple of {alignment}"
    )
    if groups_removed is not None:
        legal = [g for g in legal if g == groups_removed]
        why += f"; `kv_groups_removed` fixes it to {groups_removed}"
    space = ShapeSpace(config)
    return choose(space, ratio, group_candidates(space, ratio, legal, alignment, compensate), tolerance, why)


def group_candidates(
    space: ShapeSpace, ratio: float, legal: list[int], alignment: int, compensate: frozenset[str]
) -> Iterator[Candidate]:
    config = space.config
    groups, heads = config.num_key_value_heads, config.num_attention_heads
    for removed in legal:
        kept = groups - removed
        fixed = {
            "num_attention_heads": kept * heads // groups,
            "num_key_value_heads": kept,
            "head_dim": head_dim(config),
            "attention_bias": bool(getattr(config, "attention_bias", False))
            or ("attention" in compensate and removed > 0),
            "mlp_bias": bool(getattr(config, "mlp_bias", False)) or "mlp" in compensate,
        }
        for f in ffn_choices(space, fixed, ratio, alignment, alignment, config.intermediate_size):
            # A bias only where something was removed: compensating nothing would only add parameters.
            unpruned = f == config.intermediate_size and not getattr(config, "mlp_bias", False)
            changes = {**fixed, "intermediate_size": f, **({"mlp_bias": False} if unpruned else {})}
            # Ties go to removing fewer groups: the study's FLAP model kept more of its attention than of its MLP.
            yield Candidate(changes, space.ratio(changes), (abs(removed - ratio * groups), removed))


def resolve_shape(
    config: PretrainedConfig, method: str, ratio: float, options: dict[str, Any] | None = None
) -> TargetShape:
    """The target shape the registered pruner `method` (with `options`) would prune `config` to."""
    from hfprune.pruners import get_pruner

    pruner_cls = get_pruner(method)
    return pruner_cls(pruner_cls.Options(**(options or {}))).plan(config, ratio)
