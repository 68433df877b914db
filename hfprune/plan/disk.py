"""The plan's disk: each stage's peak bytes on disk, and the refusal of a run that the disk cannot hold.

`hfprune.plan.estimate` adds these `disk` terms to the stages of `hfprune.plan.prune_stage` and
`hfprune.plan.train_eval`: the model folders a stage writes (safetensors at the dtype it is saved in, the
packed masks of a sparse model, an allowance for tokenizer, config, card and reports), the Trainer's
checkpoints a training run keeps at once (weights and AdamW state, `save_total_limit` of them plus the one
being written before the oldest goes; every one the budget makes when the limit is unset), a wsd run's
stable run with its branch point, and sequential pruning's activation spill under $TMPDIR.

`hfprune.plan.check` then sums what is left of the run per file system (`disk_needs`): the stages that
will run (a resumed run counts what remains; a sweep, its cells with work left), the folders they leave
behind added up, their transient peaks (checkpoints, spill: gone once the stage ends) at the largest, and
refuses (`disk_problems`, exit 2 with the knobs) where that exceeds the free space.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hfprune.plan.hardware import GIB
from hfprune.plan.terms import Shape, StageEstimate, Term
from hfprune.training import schedules


MIB = 2**20
FILES_ALLOWANCE = 8 * MIB  # a model folder's tokenizer, config, card and reports (a real tokenizer: ~10 MB)
CHECKPOINT_EXTRA = 256 * 2**10  # scheduler, RNG states, trainer_state.json, training_args.bin
OPTIMIZER_BYTES = 8  # AdamW's two fp32 moments per parameter (optimizer.pt)
CHECKPOINT_KNOBS = "lower train.args.save_total_limit or raise train.args.save_steps"
OUTPUT = "output"  # where a disk term lies: the output folder,
TEMP = "temp"  # or $TMPDIR


@dataclass(frozen=True)
class DiskTerm(Term):
    """A disk term: `transient` bytes are gone once their stage ends; `folder` is OUTPUT or TEMP."""

    transient: bool = False
    folder: str = OUTPUT
    part: str = "models"  # what the refusal's message sums it under


def with_disk(stage: StageEstimate | None, terms: Iterable[Term]) -> StageEstimate | None:
    return None if stage is None else replace(stage, disk=(*stage.disk, *terms))


def model_folder(what: str, shape: Shape, sparse: bool) -> tuple[DiskTerm, ...]:
    """A model folder as a stage writes it: weights at `shape`'s dtype, masks, and the small files."""
    terms = [
        DiskTerm(what, shape.params * shape.bytes, f"P x b = {shape.gib()}"),
        DiskTerm(f"{what}: tokenizer, config, card", FILES_ALLOWANCE, "an allowance"),
    ]
    if sparse:
        terms.append(DiskTerm(f"{what}: masks", shape.linear_params // 8, "linear weights x 1 bit"))
    return tuple(terms)


def checkpoint_bytes(shape: Shape) -> int:
    """One Trainer checkpoint: fp32 weights, AdamW's two moments, and the small state files."""
    return shape.params * (4 + OPTIMIZER_BYTES) + CHECKPOINT_EXTRA


def checkpoints_kept(train: Any, budget: int) -> tuple[int, str]:
    """How many checkpoints a run holds at its peak, and why (from `train.args`, defaults as the train
    stage sets them: a save every quarter of the steps, two kept)."""
    args = train.args
    steps = schedules.steps_for(budget, schedules.tokens_per_step(train))
    if args.get("save_strategy") == "no":
        return 0, "save_strategy: no"
    every = args.get("save_steps", max(1, steps // 4))
    every = max(1, math.ceil(steps * every) if every < 1 else int(every))
    saves = math.ceil(steps / every)  # one every save_steps, and one at the last step
    limit = args.get("save_total_limit", 2)
    if limit is None:
        return saves, f"every one of {steps} steps / save_steps {every} (save_total_limit unset)"
    return min(saves, limit + 1), f"save_total_limit {limit} + the one being written, of {saves} saves"


def train_disk(run: str, shape: Shape, train: Any, budget: int, sparse: bool) -> tuple[DiskTerm, ...]:
    """A training run: its checkpoints (and a wsd run's stable run), then the trained model's folder."""
    fp32 = shape.as_dtype("float32")
    one = checkpoint_bytes(fp32)
    kept, why = checkpoints_kept(train, budget)
    each = f"P x (4 weights + {OPTIMIZER_BYTES} AdamW) B + {CHECKPOINT_EXTRA // 1024} KiB = {one:,} B"
    terms = [DiskTerm("checkpoints", kept * one, f"{kept} x {each} ({why})", True, part="checkpoints")]
    if getattr(getattr(train, "schedule", None), "type", None) == "wsd":
        # Lives until every branch from it is trained, in a sweep across cells: counted as kept.
        how = "3 checkpoints: the branch point, the newest, the one being written"
        terms.append(DiskTerm("stable run", 3 * one, how, part="stable runs"))
    return (*terms, *model_folder(f"{run} model", fp32, sparse))


@dataclass
class DiskNeed:
    """What is left of a run (or a sweep) on one file system, and the room it has."""

    folder: Path  # the nearest existing folder of the output folder (or of $TMPDIR) on that file system
    free: int
    kept: int = 0  # what the remaining stages leave behind
    peak: int = 0  # the largest transient use of one stage
    parts: dict[str, int] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    where: set[str] = field(default_factory=set)

    @property
    def need(self) -> int:
        return self.kept + self.peak

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "need_bytes": self.need,
            "free_bytes": self.free,
            "fits": self.need <= self.free,
            "parts": self.parts,
            "stages": self.stages,
        }

    def describe(self) -> str:
        return f"{size(self.need)} on the disk of {self.folder} ({size(self.free)} free)"


def size(count: int) -> str:
    if count >= GIB:
        return f"{count / GIB:.2f} GiB"
    return f"{count / MIB:.1f} MiB" if count >= MIB else f"{count / 1024:.0f} KiB"


def existing(folder: Path) -> Path:
    """The nearest existing folder of `folder` (the one a new output folder would be created in)."""
    folder = folder.absolute()
    return next((p for p in (folder, *folder.parents) if p.exists()), Path(os.sep))


def disk_needs(entries: Iterable[tuple[str | None, Any, Path, Collection[str] | None]]) -> list[DiskNeed]:
    """Per file system, what the remaining stages of each entry need: (label, plan, output folder,
    stage names still to run, None: all). A sweep passes every cell: the sums run over them all."""
    needs: dict[int, DiskNeed] = {}
    for label, plan, output, remaining in entries:
        for stage in plan.stages:
            if remaining is not None and stage.name not in remaining:
                continue
            for where, terms in _by_folder(stage.disk).items():
                folder = existing(output if where == OUTPUT else Path(tempfile.gettempdir()))
                need = needs.setdefault(
                    os.stat(folder).st_dev, DiskNeed(folder, shutil.disk_usage(folder).free)
                )
                _add(need, terms, f"{stage.name} (cell {label})" if label else stage.name, where)
    return list(needs.values())


def _by_folder(terms: Iterable[Term]) -> dict[str, list[Term]]:
    found: dict[str, list[Term]] = {}
    for term in terms:
        found.setdefault(getattr(term, "folder", OUTPUT), []).append(term)
    return found


def _add(need: DiskNeed, terms: list[Term], stage: str, where: str) -> None:
    need.kept += sum(t.bytes for t in terms if not getattr(t, "transient", False))
    need.peak = max(need.peak, sum(t.bytes for t in terms if getattr(t, "transient", False)))
    for term in terms:
        part = getattr(term, "part", "models")
        need.parts[part] = need.parts.get(part, 0) + term.bytes
    need.stages.append(stage)
    need.where.add(where)


def disk_problems(needs: Iterable[DiskNeed]) -> list[tuple[str, str]]:
    """(knob, message) for every file system with less free space than the remaining stages need."""
    found = []
    for need in needs:
        if need.need <= need.free:
            continue
        parts = ", ".join(f"{name} {size(count)}" for name, count in need.parts.items())
        head = f"the stages still to run need {need.describe()}: {parts}"
        if OUTPUT not in need.where:
            fix = "raise prune.options.max_activation_bytes or set TMPDIR to a larger disk"
            found.append(("TMPDIR", f"{head}; {fix}"))
            continue
        checkpoints = need.parts.get("checkpoints", 0)
        key = "train.args.save_total_limit" if checkpoints >= need.need - need.free else "output_dir"
        fix = f"{CHECKPOINT_KNOBS} (fewer checkpoints), free space, or choose an output_dir on a larger disk"
        found.append((key, f"{head}; {fix}"))
    return found
