"""The paper's four claims, checked against a study's grid points: one `Finding` per claim, with its numbers
and a verdict computed from them. This is the report's only verdict on each claim.

Called by `hfprune.report.study` with the study's noise (`hfprune.report.seed_noise.StudyNoise`: every
grid point's gap over its seed replicates) and the control check (`hfprune.report.control`). Every
comparison is judged against training noise: a gap, or a change in gap between two points (paired per
seed), counts only when it is more than 1.96 seed standard errors from zero, measured over at least 3
replicates or borrowed from the replicated points of the same family; the window noise is reported
beside it. A gap narrows when the pruned initialisation has an advantage to lose (the first gap is above
zero beyond noise) and loses some of it beyond noise; a gap that starts at or below zero has nothing to
narrow, so it counts against the claim. A verdict is `supported` when every group the claim speaks of
agrees, `refuted` when none does, `mixed` in between, `not testable here` when the cells hold no group
the claim speaks of (for example one budget only, for claim 2), and `not judged` when there is no seed
noise to judge by or the sweep's control disagrees with its parent.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

from hfprune.report.seed_noise import CellGroup, SeedGap, StudyNoise, with_borrowed


SUPPORTED, REFUTED, MIXED, NOT_TESTABLE = "supported", "refuted", "mixed", "not testable here"
NOT_JUDGED = "not judged"
NO_SEED_NOISE = "no seed noise: a gap is judged over at least 3 seed replicates (sweep.seed)"
FINE, COARSE = "sparse", "depth"  # the granularities claim 4 contrasts (width is reported, not judged)


@dataclass(frozen=True)
class Finding:
    """One claim of the paper: what it says, the numbers at this scale, the verdict, per-group detail."""

    number: int
    setting: int
    claim: str
    numbers: str
    verdict: str
    details: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "claim": self.number,
            "setting": self.setting,
            "text": self.claim,
            "numbers": self.numbers,
            "verdict": self.verdict,
            "details": self.details,
        }


def verdict_of(agree: list[bool | None]) -> str:
    """All groups agree: supported; none: refuted; some: mixed; no group at all: not testable; a group
    without seed noise to judge it by (None): not judged."""
    if not agree:
        return NOT_TESTABLE
    if None in agree:
        return NOT_JUDGED
    return SUPPORTED if all(agree) else REFUTED if not any(agree) else MIXED


def check_claims(noise: StudyNoise, control_disagrees: bool = False) -> list[Finding]:
    """The four claims; with a control that disagrees with its parent, every verdict is not judged."""
    findings = [
        pruned_init_wins(noise),
        narrows_with_budget(noise),
        narrows_with_ratio(noise),
        pipeline_budget(noise),
    ]
    if control_disagrees:
        note = " (not judged: the control disagrees with the parent)"
        findings = [replace(f, verdict=NOT_JUDGED, numbers=f.numbers + note) for f in findings]
    return findings


def _above(gap: SeedGap | None) -> bool | None:
    """Beyond noise above zero; None without seed noise."""
    return None if gap is None or gap.direction is None else gap.direction > 0


def pruned_init_wins(noise: StudyNoise) -> Finding:
    """Claim 1: at the same budget the pruned initialisation beats random init, in every grid point."""
    measured = [(group, gap) for group in noise.groups if (gap := noise.gap(group, 1)) is not None]
    wins = sum(gap.direction == 1 for _, gap in measured)
    losses = sum(gap.direction == -1 for _, gap in measured)
    values = [gap.value for _, gap in measured]
    numbers = (
        f"gap > 1.96 seed se in {wins} of {len(measured)} method × ratio × budget cells, "
        f"below -1.96 seed se in {losses}; gaps {min(values):+.3f} to {max(values):+.3f} nats; "
        + _noise_words([gap for _, gap in measured])
        if measured
        else "no cell measured both models"
    )
    details = [{**group.where(), **gap.to_dict(), "beyond_noise": gap.direction} for group, gap in measured]
    return Finding(
        1, 1, "same budget: the pruned init beats the random init", numbers,
        verdict_of([_above(gap) for _, gap in measured]), details,
    )  # fmt: skip


def _noise_words(gaps: list[SeedGap]) -> str:
    """Where the seed noise of `gaps` comes from, in words."""
    measured = sum(gap.noise == "measured" for gap in gaps)
    borrowed = sum(gap.noise == "borrowed" for gap in gaps)
    if not measured and not borrowed:
        return NO_SEED_NOISE
    words = f"seed noise measured in {measured}"
    return words + (f", borrowed by {borrowed} without replicates" if borrowed else "")


def narrows_with_budget(noise: StudyNoise) -> Finding:
    """Claim 2: per method and ratio, the setting-1 gap is smaller at the largest budget than the smallest."""
    lines = _trends(noise, key=lambda g: (g.method, g.ratio), along=lambda g: g.budget)
    narrowing = [_narrowed(line) for line in lines]
    numbers = _trend_numbers(lines, "method × ratio", "smallest → largest budget")
    details = [_trend_detail(line, "budget") for line in lines]
    return Finding(
        2, 1, "same budget: the gap narrows as the budget grows", numbers, verdict_of(narrowing), details
    )


def narrows_with_ratio(noise: StudyNoise) -> Finding:
    """Claim 3: per method and budget, the gap shrinks from the lowest ratio to the highest, where it is
    within noise of zero."""
    lines = _trends(noise, key=lambda g: (g.method, g.budget), along=lambda g: g.ratio)
    narrowing = [_narrowed(line) for line in lines]
    vanished = [None if line["end"].direction is None else line["end"].direction == 0 for line in lines]
    behind = sum(line["end"].direction == -1 for line in lines)
    numbers = _trend_numbers(lines, "method × budget", "lowest → highest ratio")
    if lines:
        numbers += (
            f"; at the highest ratio within noise of zero in {sum(v is True for v in vanished)}, "
            f"scratch ahead in {behind}"
        )
    verdict = verdict_of(narrowing)
    if verdict == SUPPORTED and not all(vanished):
        verdict = MIXED  # narrows everywhere, but does not nearly vanish everywhere
    details = [
        {**_trend_detail(line, "ratio"), "vanished": v} for line, v in zip(lines, vanished, strict=True)
    ]
    return Finding(
        3, 1, "same budget: the gap narrows as the ratio rises, nearly vanishing at the highest ratio",
        numbers, verdict, details,
    )  # fmt: skip


def pipeline_budget(noise: StudyNoise) -> Finding:
    """Claim 4: with scratch on the whole pipeline's tokens, at the largest budget, sparse pruning keeps
    an advantage (gap beyond noise above zero) and depth pruning does not (matched or beaten)."""
    largest: dict[tuple[str, float], tuple[CellGroup, SeedGap]] = {}
    for group in noise.groups:
        gap = noise.gap(group, 2)
        key = (group.method, group.ratio)
        if gap is not None and (key not in largest or group.budget > largest[key][0].budget):
            largest[key] = (group, gap)
    picked = [largest[key] for key in sorted(largest)]
    judged = [(group, gap) for group, gap in picked if group.granularity in (FINE, COARSE)]
    agree = [
        None if (above := _above(gap)) is None else above == (group.granularity == FINE)
        for group, gap in judged
    ]
    testable = {group.granularity for group, _ in judged} == {FINE, COARSE}
    numbers = "; ".join(
        f"{group.granularity} {group.method} {group.ratio} at {group.budget:,}: {gap.text()}"
        for group, gap in picked
    )
    if not testable:
        numbers = f"needs both sparse and depth cells in setting 2; have: {numbers or 'none'}"
    details = [
        {**group.where(), **gap.to_dict(), "beyond_noise": gap.direction,
         "judged": group.granularity in (FINE, COARSE)}
        for group, gap in picked
    ]  # fmt: skip
    return Finding(
        4, 2,
        "pipeline budget: fine granularity (sparse) keeps an advantage; coarse (depth) is matched or beaten by scratch",
        numbers, verdict_of(agree) if testable else NOT_TESTABLE, details,
    )  # fmt: skip


def _trends(
    noise: StudyNoise, key: Callable[[CellGroup], Hashable], along: Callable[[CellGroup], float]
) -> list[dict[str, Any]]:
    """Per line (`key`) with at least two values of `along`: the setting-1 gap at the first and last,
    and the change first - last (positive: the gap narrowed), paired per seed; a change without
    replicates borrows the pooled seed noise of the measured changes, else its two ends' (unpaired)."""
    lines: dict[Hashable, list[tuple[CellGroup, SeedGap]]] = {}
    for group in noise.groups:
        if (gap := noise.gap(group, 1)) is not None:
            lines.setdefault(key(group), []).append((group, gap))
    found = []
    for line, members in sorted(lines.items(), key=lambda item: item[0]):
        members.sort(key=lambda member: along(member[0]))
        (first, start), (last, end) = members[0], members[-1]
        if along(first) != along(last) and (change := start.minus(end)) is not None:
            found.append({"group": line, "from": along(first), "to": along(last), "start": start, "end": end, "change": change})  # fmt: skip
    changes = with_borrowed([f["change"] for f in found], [[("changes", 0)]] * len(found))
    for line, change in zip(found, changes, strict=True):
        line["change"] = (
            change if change.seed_se is not None else _unpaired(change, line["start"], line["end"])
        )
    return found


def _unpaired(change: SeedGap, start: SeedGap, end: SeedGap) -> SeedGap:
    if start.seed_se is None or end.seed_se is None:
        return change
    se = math.hypot(start.seed_se, end.seed_se)
    return replace(change, seed_se=se, noise="borrowed", source="the seed noise of its two ends, unpaired")


def _trend_numbers(lines: list[dict[str, Any]], groups: str, direction: str) -> str:
    if not lines:
        return f"no {groups} group with two or more values to compare"
    narrowed = sum(_narrowed(line) is True for line in lines)
    widened = sum(line["change"].direction == -1 for line in lines)
    starts = [line["start"].value for line in lines]
    ends = [line["end"].value for line in lines]
    return (
        f"narrows beyond seed noise in {narrowed} of {len(lines)} {groups} lines, widens in {widened}; "
        f"median gap {statistics.median(starts):+.3f} → {statistics.median(ends):+.3f} nats ({direction}); "
        + _noise_words([line["change"] for line in lines])
    )


def _trend_detail(line: dict[str, Any], along: str) -> dict[str, Any]:
    first, second = line["group"]
    names = ("method", "ratio") if along == "budget" else ("method", "budget")
    return {
        names[0]: first,
        names[1]: second,
        f"{along}_from": line["from"],
        f"{along}_to": line["to"],
        "gap_from": line["start"].to_dict(),
        "gap_to": line["end"].to_dict(),
        "narrowing": line["change"].to_dict(),
        "narrowed": _narrowed(line),
    }


def _narrowed(line: dict[str, Any]) -> bool | None:
    """The pruned initialisation had an advantage at the first value and lost some of it by the last;
    None without seed noise to judge by."""
    start, change = line["start"].direction, line["change"].direction
    if start is None or change is None:
        return None
    return start > 0 and change > 0
