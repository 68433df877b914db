"""Training noise: a study's gaps over seed replicates, and the standard error a verdict is judged by.

Called by `hfprune.report.findings` and `hfprune.report.study` with the cells `hfprune.report.cells`
read. A sweep with `sweep.seed` replays the whole pipeline per seed, so a grid point (method, ratio,
budget) has one cell per seed: a `CellGroup`. Its gap is a `SeedGap`: the gap measured in each replicate
(paired: the same seed's continued model and twin), their mean, and

- the seed noise: the standard error of that mean over the replicates, sd / sqrt(n), measured when the
  point has at least `MIN_REPLICATES` seeds; a point with fewer borrows the pooled sd of the measured
  points of its family (`with_borrowed`: the same setting and budget, else the same setting) and says so;
  without any measured point there is no seed noise and nothing is judged;
- the window noise beside it: the per-window paired standard error of each replicate's gap, combined
  for the mean. It is reported, never the criterion: it leaves out how much training itself varies.

A gap is beyond noise when it is more than 1.96 seed standard errors from zero (`SeedGap.direction`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from hfprune import kinds
from hfprune.eval.perplexity import Z_95
from hfprune.report.cells import Gap, StudyCell


MIN_REPLICATES = 3
MEASURED, BORROWED, NO_NOISE = "measured", "borrowed", "none"


@dataclass(frozen=True)
class SeedGap:
    """A gap (or a change in gap) in each seed replicate, with its seed and window noise."""

    per_seed: dict[int, float]
    window_se: float | None
    seed_se: float | None = None
    noise: str = NO_NOISE  # MEASURED, BORROWED (from `source`) or NO_NOISE
    source: str = ""  # where borrowed noise comes from, in words

    @classmethod
    def of(cls, gaps: dict[int, Gap]) -> SeedGap | None:
        """The gaps of one point's replicates (seed -> paired gap); seed noise measured from 3 seeds."""
        if not gaps:
            return None
        values = {seed: gap.value for seed, gap in sorted(gaps.items())}
        ses = [gap.se for gap in gaps.values()]
        window = None if None in ses else math.sqrt(sum(se * se for se in ses)) / len(ses)  # type: ignore[operator]
        found = cls(values, window)
        sd = found.sd
        return found if sd is None else replace(found, seed_se=sd / math.sqrt(found.n), noise=MEASURED)

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def value(self) -> float:
        return statistics.fmean(self.per_seed.values())

    @property
    def sd(self) -> float | None:
        """The spread over seeds; None below `MIN_REPLICATES` replicates."""
        return statistics.stdev(self.per_seed.values()) if self.n >= MIN_REPLICATES else None

    @property
    def direction(self) -> int | None:
        """+1 above zero by more than 1.96 seed se, -1 below, 0 within; None without seed noise."""
        if self.seed_se is None:
            return None
        margin = Z_95 * self.seed_se
        return 1 if self.value > margin else -1 if self.value < -margin else 0

    def minus(self, other: SeedGap) -> SeedGap | None:
        """The change self - other, paired per seed (the seeds both have); its noise measured likewise."""
        common = sorted(set(self.per_seed) & set(other.per_seed))
        if not common:
            return None
        values = {seed: self.per_seed[seed] - other.per_seed[seed] for seed in common}
        windows = (
            None if None in (self.window_se, other.window_se) else math.hypot(self.window_se, other.window_se)
        )  # type: ignore[arg-type]
        found = SeedGap(values, windows)
        sd = found.sd
        return found if sd is None else replace(found, seed_se=sd / math.sqrt(found.n), noise=MEASURED)

    def text(self) -> str:
        seeds = "-" if self.seed_se is None else f"{self.seed_se:.3f}"
        windows = "" if self.window_se is None else f", windows {self.window_se:.3f}"
        return f"{self.value:+.3f} ± {seeds} (seeds{windows})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "gap": round(self.value, 6),
            "se": _round(self.seed_se),
            "seed_se": _round(self.seed_se),
            "seed_sd": _round(self.sd),
            "window_se": _round(self.window_se),
            "seeds": list(self.per_seed),
            "per_seed": {str(seed): round(value, 6) for seed, value in self.per_seed.items()},
            "noise": self.noise,
            "noise_source": self.source or None,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


@dataclass(frozen=True)
class Pool:
    """The pooled spread over seeds of a family of measured gaps: sqrt(sum (n-1) sd^2 / sum (n-1))."""

    sd: float
    groups: int
    label: str

    @classmethod
    def of(cls, gaps: Iterable[SeedGap | None], label: str) -> Pool | None:
        measured = [g for g in gaps if g is not None and g.sd is not None]
        dof = sum(g.n - 1 for g in measured)
        if not dof:
            return None
        variance = sum((g.n - 1) * g.sd**2 for g in measured) / dof  # type: ignore[operator]
        return cls(math.sqrt(variance), len(measured), label)

    def lend(self, gap: SeedGap) -> SeedGap:
        source = f"pooled seed sd {self.sd:.3f} of {self.groups} replicated {self.label}"
        return replace(gap, seed_se=self.sd / math.sqrt(gap.n), noise=BORROWED, source=source)


def with_borrowed(gaps: list[SeedGap | None], families: list[list[tuple[str, Any]]]) -> list[SeedGap | None]:
    """`gaps` with seed noise lent to those without: from the pool of the first family (a list of
    (label, key) per gap, most specific first) whose measured members share the gap's key."""
    filled: list[SeedGap | None] = []
    for index, gap in enumerate(gaps):
        if gap is None or gap.seed_se is not None:
            filled.append(gap)
            continue
        for level, (label, key) in enumerate(families[index]):
            same = [g for i, g in enumerate(gaps) if families[i][level][1] == key]
            pool = Pool.of(same, label)
            if pool is not None:
                gap = pool.lend(gap)
                break
        filled.append(gap)
    return filled


@dataclass
class CellGroup:
    """One grid point of a study (method, ratio, budget) and its cells, one per seed replicate."""

    method: str
    granularity: str
    ratio: float
    budget: int
    cells: dict[int, StudyCell] = field(default_factory=dict)

    def raw_gap(self, setting: int) -> SeedGap | None:
        """The point's gap in `setting` over its replicates, with seed noise only where measured."""
        return SeedGap.of({seed: gap for seed, cell in self.cells.items() if (gap := cell.gap(setting))})

    def where(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "granularity": self.granularity,
            "ratio": self.ratio,
            "budget": self.budget,
        }


def group_cells(cells: list[StudyCell]) -> list[CellGroup]:
    """The cells by grid point, in (method, ratio, budget) order."""
    groups: dict[tuple[str, float, int], CellGroup] = {}
    for cell in cells:
        key = (cell.method, cell.ratio, cell.budget)
        group = groups.setdefault(key, CellGroup(cell.method, cell.granularity, cell.ratio, cell.budget))
        group.cells[cell.seed] = cell
    return [groups[key] for key in sorted(groups)]


class StudyNoise:
    """Every grid point's gap per setting with its seed noise, measured or borrowed (`with_borrowed`:
    from the replicated points of the same setting and budget, else of the same setting)."""

    def __init__(self, cells: list[StudyCell]) -> None:
        self.cells = cells
        self.groups = group_cells(cells)
        self._gaps: dict[int, list[SeedGap | None]] = {}
        for setting in (1, 2):
            raw = [group.raw_gap(setting) for group in self.groups]
            families = [
                [
                    (f"points at budget {g.budget:,} (setting {setting})", g.budget),
                    (f"points (setting {setting})", 0),
                ]
                for g in self.groups
            ]
            self._gaps[setting] = with_borrowed(raw, families)

    def gap(self, group: CellGroup, setting: int) -> SeedGap | None:
        return self._gaps[setting][self.groups.index(group)]

    @property
    def seeds(self) -> list[int]:
        return sorted({cell.seed for cell in self.cells})

    @property
    def replicated(self) -> int:
        """Grid points with at least `MIN_REPLICATES` seeds."""
        return sum(len(group.cells) >= MIN_REPLICATES for group in self.groups)


def spread(noise: StudyNoise) -> list[dict[str, Any]]:
    """Per budget and kind (and each setting's gap): the spread over seeds, pooled over the points
    with at least `MIN_REPLICATES` replicates (None without), and the median window se beside it."""
    rows = []
    for budget in sorted({group.budget for group in noise.groups}):
        groups = [group for group in noise.groups if group.budget == budget]
        cells = [cell for group in groups for cell in group.cells.values()]
        for kind in [k for k in kinds.names() if any(k in cell.scores for cell in cells)]:
            per_point = [
                SeedGap({seed: c.scores[kind].nll for seed, c in g.cells.items() if kind in c.scores}, None)
                for g in groups
            ]
            windows = [c.scores[kind].se for c in cells if kind in c.scores]
            rows.append(_spread_row(budget, kind, Pool.of(per_point, "points"), windows))
        for setting in (1, 2):
            windows = [gap.se for cell in cells if (gap := cell.gap(setting))]
            if windows:
                pool = Pool.of([group.raw_gap(setting) for group in groups], "points")
                rows.append(_spread_row(budget, f"gap (setting {setting})", pool, windows))
    return rows


def _spread_row(budget: int, what: str, pool: Pool | None, windows: list[float | None]) -> dict[str, Any]:
    known = [se for se in windows if se is not None]
    return {
        "budget": budget,
        "kind": what,
        "seed_sd": None if pool is None else round(pool.sd, 6),
        "points": 0 if pool is None else pool.groups,
        "window_se": round(statistics.median(known), 6) if known else None,
    }
