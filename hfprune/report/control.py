"""The sweep's control in the report: the parent's shape trained again from scratch, beside the parent.

Called by `hfprune.report.study` with the sweep folder and its cells. Each seed's control
(`hfprune.sweep.control`: `<sweep>/control[-s<seed>]/control.json`) was trained through the train stage
the twins use on the parent's own pretraining tokens, from another initialisation, and scored on the
same held-out windows as the cells. Per seed its gap to the parent of that seed is

    gap = mean NLL(control) - mean NLL(parent)   (nats; window noise: paired per window)

and over the seeds (`hfprune.report.seed_noise.SeedGap`) the control agrees with the parent when that mean
gap is within 1.96 seed standard errors of zero (at least 3 replicates). A control that disagrees means
the twins are not trained the way the parent was: the report says so at its top and judges no claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfprune import kinds
from hfprune.outputs import read_json
from hfprune.report.cells import Gap, Score, StudyCell
from hfprune.report.seed_noise import MIN_REPLICATES, SeedGap
from hfprune.sweep.control import RECORD


AGREES = "agrees"
DISAGREES = "disagrees"
NOT_JUDGED = "not judged"


@dataclass(frozen=True)
class ControlCheck:
    """The controls of a sweep: per seed the control and its parent, and the verdict over the seeds."""

    per_seed: list[dict[str, Any]]
    gap: SeedGap | None

    @property
    def status(self) -> str:
        direction = None if self.gap is None else self.gap.direction
        return NOT_JUDGED if direction is None else AGREES if direction == 0 else DISAGREES

    def summary(self) -> str:
        """The control in one sentence: its gap to the parent, the seed noise and the verdict."""
        if self.gap is None:
            return "control: no parent score of the same seed to compare it with; not judged"
        if self.gap.seed_se is None:
            return (
                f"control - parent {self.gap.value:+.3f} nats over {self.gap.n} seed(s): not judged "
                f"(seed noise needs at least {MIN_REPLICATES} seed replicates)"
            )
        return (
            f"control - parent {self.gap.text()} nats over {self.gap.n} seeds: the control {self.status} "
            f"with the parent ({'within' if self.status == AGREES else 'beyond'} 1.96 seed se)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "summary": self.summary(),
            "gap": None if self.gap is None else self.gap.to_dict(),
            "per_seed": self.per_seed,
        }


def read_controls(folder: Path, cells: list[StudyCell]) -> ControlCheck | None:
    """The controls under `folder` set beside the parents of the cells; None when the sweep has none."""
    records = [read_json(path, None) for path in sorted(folder.glob(f"*/{RECORD}"))]
    records = [r for r in records if isinstance(r, dict) and r.get("perplexity")]
    if not records:
        return None
    parent_name = kinds.PARENT.name
    parents = {cell.seed: cell.scores[parent_name] for cell in cells if parent_name in cell.scores}
    rows, gaps = [], {}
    for record in sorted(records, key=lambda r: r.get("seed", 0)):
        seed = int(record.get("seed", 0))
        entry = next(iter(record["perplexity"].values()))  # the first held-out set, as the cells'
        control, parent = _score(entry), parents.get(seed)
        gap = Gap.between(control, parent) if parent is not None else None
        if gap is not None:
            gaps[seed] = gap
        rows.append({
            "seed": seed,
            "init_seed": record.get("init_seed"),
            "tokens_trained": record.get("tokens_trained"),
            "control_perplexity": round(control.perplexity, 4),
            "parent_perplexity": None if parent is None else round(parent.perplexity, 4),
            "gap": None if gap is None else gap.to_dict(),
        })  # fmt: skip
    return ControlCheck(rows, SeedGap.of(gaps))


def _score(entry: dict[str, Any]) -> Score:
    windows = tuple(entry.get("window_nll") or ())
    nll = entry.get("protocol", {}).get("nll", math.log(entry["value"]))
    return Score(nll=nll, se=entry.get("nll_se"), windows=windows)
