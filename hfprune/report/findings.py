"""The paper's four claims, checked against a study's cells: one `Finding` per claim, with its numbers and
a verdict computed from them.

Called by `hfprune.report.study` with the cells it read. Every comparison is judged against noise: a
gap, or a change in gap between two cells, counts only when it is more than 1.96 standard errors of
the per-window paired differences (`Gap.direction`). A gap narrows when the pruned initialisation
has an advantage to lose (the first gap is above zero beyond noise) and loses some of it beyond noise;
a gap that starts at or below zero has nothing to narrow, so it counts against the claim. A verdict is `supported` when every group the
claim speaks of agrees, `refuted` when none does, `mixed` in between, and `not testable here` when the
cells hold no group the claim speaks of (for example one budget only, for claim 2).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from hfprune.report.cells import Gap, StudyCell


SUPPORTED, REFUTED, MIXED, NOT_TESTABLE = "supported", "refuted", "mixed", "not testable here"
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


def verdict_of(agree: list[bool]) -> str:
    """All groups agree: supported; none: refuted; some: mixed; no group at all: not testable."""
    if not agree:
        return NOT_TESTABLE
    return SUPPORTED if all(agree) else REFUTED if not any(agree) else MIXED


def check_claims(cells: list[StudyCell]) -> list[Finding]:
    return [
        pruned_init_wins(cells),
        narrows_with_budget(cells),
        narrows_with_ratio(cells),
        pipeline_budget(cells),
    ]


def pruned_init_wins(cells: list[StudyCell]) -> Finding:
    """Claim 1: at the same budget the pruned initialisation beats random init, in every cell."""
    measured = [(cell, gap) for cell in cells if (gap := cell.gap(1)) is not None]
    wins = sum(gap.direction > 0 for _, gap in measured)
    losses = sum(gap.direction < 0 for _, gap in measured)
    values = [gap.value for _, gap in measured]
    numbers = (
        f"gap > 1.96 se in {wins} of {len(measured)} method × ratio × budget cells, "
        f"below -1.96 se in {losses}; gaps {min(values):+.3f} to {max(values):+.3f} nats"
        if measured
        else "no cell measured both models"
    )
    details = [{**_where(cell), **gap.to_dict(), "beyond_noise": gap.direction} for cell, gap in measured]
    return Finding(
        1, 1, "same budget: the pruned init beats the random init", numbers,
        verdict_of([gap.direction > 0 for _, gap in measured]), details,
    )  # fmt: skip


def narrows_with_budget(cells: list[StudyCell]) -> Finding:
    """Claim 2: per method and ratio, the setting-1 gap is smaller at the largest budget than the smallest."""
    lines = _trends(cells, key=lambda c: (c.method, c.ratio), along=lambda c: c.budget)
    narrowing = [_narrowed(line) for line in lines]
    numbers = _trend_numbers(lines, "method × ratio", "smallest → largest budget")
    details = [_trend_detail(line, "budget") for line in lines]
    return Finding(
        2, 1, "same budget: the gap narrows as the budget grows", numbers, verdict_of(narrowing), details
    )


def narrows_with_ratio(cells: list[StudyCell]) -> Finding:
    """Claim 3: per method and budget, the gap shrinks from the lowest ratio to the highest, where it is
    within noise of zero."""
    lines = _trends(cells, key=lambda c: (c.method, c.budget), along=lambda c: c.ratio)
    narrowing = [_narrowed(line) for line in lines]
    vanished = [line["end"].direction == 0 for line in lines]
    behind = sum(line["end"].direction < 0 for line in lines)
    numbers = _trend_numbers(lines, "method × budget", "lowest → highest ratio")
    if lines:
        numbers += (
            f"; at the highest ratio within noise of zero in {sum(vanished)}, scratch ahead in {behind}"
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


def pipeline_budget(cells: list[StudyCell]) -> Finding:
    """Claim 4: with scratch on the whole pipeline's tokens, at the largest budget, sparse pruning keeps
    an advantage (gap beyond noise above zero) and depth pruning does not (matched or beaten)."""
    largest: dict[tuple[str, float], tuple[StudyCell, Gap]] = {}
    for cell in cells:
        gap = cell.gap(2)
        key = (cell.method, cell.ratio)
        if gap is not None and (key not in largest or cell.budget > largest[key][0].budget):
            largest[key] = (cell, gap)
    picked = [largest[key] for key in sorted(largest)]
    judged = [(cell, gap) for cell, gap in picked if cell.granularity in (FINE, COARSE)]
    agree = [(gap.direction > 0) == (cell.granularity == FINE) for cell, gap in judged]
    testable = {cell.granularity for cell, _ in judged} == {FINE, COARSE}
    numbers = "; ".join(
        f"{cell.granularity} {cell.method} {cell.ratio} at {cell.budget:,}: {gap.text()}"
        for cell, gap in picked
    )
    if not testable:
        numbers = f"needs both sparse and depth cells in setting 2; have: {numbers or 'none'}"
    details = [
        {
            **_where(cell),
            **gap.to_dict(),
            "beyond_noise": gap.direction,
            "judged": cell.granularity in (FINE, COARSE),
        }
        for cell, gap in picked
    ]
    return Finding(
        4, 2,
        "pipeline budget: fine granularity (sparse) keeps an advantage; coarse (depth) is matched or beaten by scratch",
        numbers, verdict_of(agree) if testable else NOT_TESTABLE, details,
    )  # fmt: skip


def _where(cell: StudyCell) -> dict[str, Any]:
    return {
        "method": cell.method,
        "granularity": cell.granularity,
        "ratio": cell.ratio,
        "budget": cell.budget,
    }


def _trends(
    cells: list[StudyCell], key: Callable[[StudyCell], Hashable], along: Callable[[StudyCell], float]
) -> list[dict[str, Any]]:
    """Per group (`key`) with at least two values of `along`: the setting-1 gap at the first and last,
    and the change first - last (positive: the gap narrowed), paired per window."""
    groups: dict[Hashable, list[StudyCell]] = {}
    for cell in cells:
        if cell.gap(1) is not None:
            groups.setdefault(key(cell), []).append(cell)
    lines = []
    for group, members in sorted(groups.items(), key=lambda item: item[0]):
        members.sort(key=along)
        if along(members[0]) == along(members[-1]):
            continue
        start, end = members[0].gap(1), members[-1].gap(1)
        assert start is not None and end is not None  # grouped only when measured
        lines.append(
            {"group": group, "from": along(members[0]), "to": along(members[-1]), "start": start, "end": end,
             "change": start.minus(end)}
        )  # fmt: skip
    return lines


def _trend_numbers(lines: list[dict[str, Any]], groups: str, direction: str) -> str:
    if not lines:
        return f"no {groups} group with two or more values to compare"
    narrowed = sum(_narrowed(line) for line in lines)
    widened = sum(line["change"].direction < 0 for line in lines)
    starts = sorted(line["start"].value for line in lines)
    ends = sorted(line["end"].value for line in lines)
    return (
        f"narrows beyond noise in {narrowed} of {len(lines)} {groups} lines, widens in {widened}; "
        f"median gap {_median(starts):+.3f} → {_median(ends):+.3f} nats ({direction})"
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


def _narrowed(line: dict[str, Any]) -> bool:
    """The pruned initialisation had an advantage at the first value and lost some of it by the last."""
    return line["start"].direction > 0 and line["change"].direction > 0


def _median(values: list[float]) -> float:
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
