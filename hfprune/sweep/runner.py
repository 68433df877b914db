"""`hfprune sweep RECIPE`: one recipe, a grid of runs over method x ratio x token budget.

Sits above the pipeline. `hfprune.sweep.grid.load_sweep` expands a recipe's `sweep:` section into ordinary
recipes, one per grid cell, each with its own output folder under the sweep's (the single-run output
contract, so `hfprune run <cell>/recipe.yaml` reproduces any cell alone). `run_sweep` runs each cell as
an ordinary `Pipeline`, handing its stages providers (`hfprune.pipeline.providers`) that take from the rest of
the sweep what the cell would otherwise recompute:

- the parent, evaluated once and loaded once per prune (a prune changes it in place, and the next cell
  that needs it reloads it from disk: no copy of the parent is ever held beside it);
- calibration tokens, and a method's importance scores computed once for all its ratios where the
  method allows it (`Pruner.score_for_ratios`);
- the pruned model of the same method and ratio at another budget (hard links, no second copy), and
  the scores of any model a finished cell evaluated with the same inputs;
- the random-init twin of any cell with the identical architecture, masks and training inputs (depth
  methods at one ratio keep the same number of layers, so their twins are the same model).

With the cosine schedule (the default) a larger budget never continues from a smaller budget's
checkpoint: the schedule is fitted to each budget (cosine reaching its floor exactly when the budget is
spent), so the smaller run ends at the floor, not at the point the larger run passes through on its way.
Each budget trains from the start; the plan says so per cell, and the larger run's learning curve shows
its earlier points. With `train.schedule.type: wsd` the budgets of one model share a stable run under
the sweep folder (`.hfprune/stable/`), and each budget is a decay branch from it (`hfprune.training.branches`):
the sweep costs about the largest budget plus the decays, and `--dry-run` prints the branch plan.

After the cells, the sweep writes `hfprune report` into its folder and embeds the plots in every
cell's model cards before any push. Finished cells are skipped on rerun (each cell's stage ledger);
`--only method=wanda,ratio=0.5` runs a subset, so a CI matrix can fan a sweep out.

Seed replicates (`sweep.seed`) are cells like any other: every shared provider keys on the seed too (the
parent by its section, which names the seed's folder; scores, twins and stable runs by fingerprints
that hold the seed), so nothing crosses from one replicate to another. With `sweep.control: true` the
control of each seed (`hfprune.sweep.control`) runs after the selected cells of that seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hfprune import distributed, kinds
from hfprune.failures import translate_oom
from hfprune.hub import Parent
from hfprune.outputs import atomic_dir, output_lock, read_json, remove_stale_temporaries
from hfprune.pipeline.providers import (
    FreshScores,
    LoadedParent,
    Providers,
    Scores,
    files_hash,
    link_tree,
    scores_for,
    twin_shape,
)
from hfprune.pipeline.runner import Pipeline, context_for, making_stage
from hfprune.pipeline.stages.base import Context
from hfprune.pipeline.workspace import Workspace
from hfprune.pruners.base import Pruner
from hfprune.recipe.schema import Recipe
from hfprune.report.writer import write_report
from hfprune.sweep.control import control_status, run_control
from hfprune.sweep.grid import Cell, Sweep
from hfprune.training.schedules import stable_group


logger = logging.getLogger(__name__)

PUBLISHING = ("card", "push")


# -- what the cells share ------------------------------------------------------------------------


class SharedParent(LoadedParent):
    """One parent for every cell of a seed (they all have the base recipe's parent section), never copied:
    a prune takes it (in place, as a single run does) and the next cell that needs it reloads it from
    disk, so the sweep holds one parent at a time. Its evaluation and the scores are shared across cells
    all the same (siblings' metrics, `SharedScores`); the scores are computed before the prune takes it.
    Seed replicates have a parent each (`parent.model` per seed): a cell of another parent section drops
    the one held and loads its own."""

    def __init__(self) -> None:
        super().__init__()
        self._section: str | None = None

    def get(self, recipe: Recipe) -> Parent:
        section = recipe.fingerprint("parent", "seed")
        if section != self._section:
            self._parent, self._section = None, section
        return super().get(recipe)


class SharedScores(FreshScores):
    """Calibration tokens per calibration section, and a method's scores for all of its ratios."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self._calibration: dict[str, torch.Tensor] = {}
        self._scores: dict[str, Scores | None] = {}

    def calibration(self, recipe: Recipe, tokenizer: Any) -> torch.Tensor:
        key = recipe.fingerprint("calibration")
        if key not in self._calibration:
            self._calibration[key] = super().calibration(recipe, tokenizer)
        return self._calibration[key]

    def scores(
        self, recipe: Recipe, pruner: Pruner, model: PreTrainedModel, calibration: torch.Tensor | None
    ) -> Scores | None:
        method = recipe.prune.method
        key = json.dumps(
            [method, recipe.prune.options, recipe.fingerprint("calibration", "seed")], sort_keys=True
        )
        if key not in self._scores:
            ratios = sorted({c.ratio for c in self.sweep.cells if c.recipe.prune.method == method})
            with translate_oom("calibration scores shared by the sweep"):
                self._scores[key] = scores_for(pruner, model, calibration, ratios, recipe, shared=True)
        return self._scores[key]


class SharedWork:
    """What the cells of one sweep compute once (parent, calibration, scores) and how a cell finds
    finished siblings; `providers(cell)` hands a cell all of it."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.parent = SharedParent()
        self.scores = SharedScores(sweep)
        self.figures = ReportFigures(sweep.output_path)
        self.stable = SweepStable(sweep)

    def providers(self, cell: Cell) -> Providers:
        siblings = Siblings(self, cell)
        return Providers(
            parent=self.parent,
            scores=self.scores,
            twins=siblings,
            donors=siblings,
            figures=self.figures,
            stable=self.stable,
        )

    def context(self, cell: Cell) -> Context:
        return context_for(cell.recipe, self.providers(cell))

    def finished(
        self, cell: Cell, stage: str, accept: Callable[[Context], bool]
    ) -> Iterator[tuple[Cell, Context]]:
        """Other cells whose `stage` is finished and up to date, and that `accept` (their context)."""
        for other in self.sweep.cells:
            if other.id == cell.id:
                continue
            sibling = self.context(other)
            if stage in sibling.table and sibling.is_current(stage) and accept(sibling):
                yield other, sibling


class SweepStable:
    """Stable runs (`hfprune.training.branches`) under the sweep folder, shared by its cells: one branches at every
    budget of every cell whose kind shares it (`hfprune.training.schedules.stable_group`), run or not."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep

    def folder(self, ctx: Context, key: str) -> Path:
        return self.sweep.output_path / ".hfprune" / "stable" / key

    def budgets(self, ctx: Context, kind: str) -> list[int]:
        group = stable_group(ctx.recipe, kind)
        cells = [cell.recipe for cell in self.sweep.cells if cell.recipe.train is not None]
        return [r.token_budget(k) for r in cells for k in r.train.runs if stable_group(r, k) == group]


class Siblings:
    """A cell's donors and twin source: finished cells of the sweep whose work is identical to its own."""

    def __init__(self, shared: SharedWork, cell: Cell) -> None:
        self.shared, self.cell = shared, cell

    def _same_inputs(self, ctx: Context, stage: str) -> tuple[Cell, Context] | None:
        mine = ctx.fingerprint(stage)
        return next(self.shared.finished(self.cell, stage, lambda s: s.fingerprint(stage) == mine), None)

    def copy_scores(self, ctx: Context, stage: str, kind: str) -> bool:
        """Take `kind`'s scores from a cell that evaluated the same model the same way."""
        found = self._same_inputs(ctx, stage)
        scores = found[1].workspace.metrics.get(kind) if found else None
        if not scores:
            return False
        ctx.workspace.metrics.update(kind, **{k: v for k, v in scores.items() if k != "hub"})  # not its repos
        return True

    def link_model(self, ctx: Context, stage: str, kind: str) -> bool:
        found = self._same_inputs(ctx, stage)
        if found is None:
            return False
        logger.info("cell %s: %s model shared with %s (hard links)", self.cell.id, kind, found[0].id)
        with atomic_dir(ctx.workspace.model_dir(kind)) as tmp:
            link_tree(found[1].workspace.model_dir(kind), tmp)
        return True

    def take(self, ctx: Context, kind: str) -> bool:
        """Publish a finished sibling's twin with the same `twin_key` as this cell's `kind`."""
        key = twin_key(ctx)
        stage = making_stage(kinds.get(kind))
        found = key and next(self.shared.finished(self.cell, stage, lambda s: twin_key(s) == key), None)
        if not found:
            return False
        donor, sibling = found
        logger.info(
            "cell %s: %s twin shared with %s (same architecture and inputs)", self.cell.id, kind, donor.id
        )
        if distributed.is_main_process():
            with atomic_dir(ctx.workspace.model_dir(kind)) as tmp:
                link_tree(sibling.workspace.model_dir(kind), tmp)
            trained = sibling.workspace.metrics.get(kind)
            training = ("tokens_trained", "training", "setting", "curve", "branch")
            kept = {k: trained[k] for k in training if k in trained}
            ctx.workspace.metrics.update(kind, replace=True, **kept, shared_from=donor.id)
        return True


def twin_key(ctx: Context) -> str | None:
    """What a random-init twin is made of: the pruned architecture, the masks, the training inputs.

    None when the twin keeps the parent's embeddings and norms (then it depends on which weights the
    method kept) or before the pruned model exists.
    """
    spec, ws = ctx.recipe.train, ctx.workspace
    config_path = ws.pruned_dir / "config.json"
    if spec is None or not spec.reinit_embeddings_and_norms or not config_path.is_file():
        return None
    config, masks = twin_shape(ws)
    parts = [json.dumps(config, sort_keys=True), masks, ctx.recipe.fingerprint("train", "eval", "seed")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class ReportFigures:
    """The sweep report's PNGs (none before the first report), shown in every cell's cards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def paths(self) -> list[Path]:
        report = read_json(self.folder / "report.json", {})
        return [self.folder / name for name in report.get("plots", [])]

    def fingerprint(self) -> str:
        return files_hash(self.paths())

    def place(self, workspace: Workspace) -> list[str]:
        figures = self.paths()
        for kind in workspace.saved_kinds(carded=True):
            for figure in figures:
                shutil.copyfile(figure, workspace.model_dir(kind) / figure.name)
        return [figure.name for figure in figures]


# -- running -------------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    output_dir: Path
    ran: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def run_sweep(sweep: Sweep, only: Iterable[str] = (), *, force: bool = False) -> SweepSummary:
    """Run the selected cells, write the sweep's report, then cards with its plots (and pushes)."""
    cells = sweep.select(only)
    shared = SharedWork(sweep)
    summary = SweepSummary(sweep.output_path)
    for index, cell in enumerate(cells, 1):
        logger.info("sweep %s: cell %d/%d %s", sweep.name, index, len(cells), cell.id)
        pipeline = Pipeline(cell.recipe, providers=shared.providers(cell), force=force, skip=("push",))
        outcome = pipeline.execute()
        (summary.ran if any(o.ran for o in outcome.outcomes) else summary.up_to_date).append(cell.id)
    # The control of every seed whose cells ran here (`sweep.control`): after them, so the seed's
    # parent exists and is out of memory.
    for control in [c for c in sweep.controls if c.seed in {cell.seed for cell in cells}]:
        (summary.up_to_date if control_status(control) == "finished" else summary.ran).append(control.id)
        run_control(control)
    if distributed.is_main_process():
        summary.report = _locked_report(sweep.output_path)
    distributed.barrier()
    for cell in cells:
        Pipeline(cell.recipe, providers=shared.providers(cell), only=PUBLISHING).execute()
    return summary


def _locked_report(folder: Path) -> dict[str, Any]:
    """Write the sweep's report holding the sweep folder's lock (each cell's folder has its own, taken by
    its `Pipeline`), so two sweeps fanned out over one folder never write the report at once. Only the
    report's own leftovers are cleared: the cells below may be running in other processes."""
    with output_lock(folder):
        remove_stale_temporaries(folder, recursive=False)
        return write_report(folder)
