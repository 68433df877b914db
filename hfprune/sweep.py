"""`hfprune sweep RECIPE`: one recipe, a grid of runs over method x ratio x token budget.

Sits above the pipeline. `hfprune.grid.load_sweep` expands a recipe's `sweep:` section into ordinary
recipes, one per grid cell, each with its own output folder under the sweep's (the single-run output
contract, so `hfprune run <cell>/recipe.yaml` reproduces any cell alone). `run_sweep` runs the cells'
stages with `CellRun`, which takes from the rest of the sweep what it would otherwise recompute:

- the parent, loaded and evaluated once (each prune works on a copy);
- calibration tokens, and a method's importance scores computed once for all its ratios where the
  method allows it (`Pruner.score_for_ratios`);
- the pruned model of the same method and ratio at another budget (hard links, no second copy);
- the scratch twin of any cell with the identical architecture, masks and training inputs (depth
  methods at one ratio keep the same number of layers, so their twins are the same model).

A larger budget never continues from a smaller budget's checkpoint: the learning-rate schedule is
fitted to each budget (cosine reaching its floor exactly when the budget is spent), so the smaller run
ends at the floor, not at the point the larger run passes through on its way. Each budget trains from
the start; the plan says so per cell, and the larger run's learning curve shows its earlier points.

After the cells, the sweep writes `hfprune report` into its folder and embeds the plots in every
cell's model cards before any push. Finished cells are skipped on rerun (each cell's stage ledger);
`--only method=wanda,ratio=0.5` runs a subset, so a CI matrix can fan a sweep out.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfprune import distributed
from hfprune.data import calibration_tokens
from hfprune.grid import Cell, Sweep, SweepError, load_sweep
from hfprune.hub import Parent, load_parent
from hfprune.outputs import atomic_dir, read_json, write_json
from hfprune.pipeline import Run
from hfprune.pruners import Pruner, PruneResult
from hfprune.recipe import Recipe
from hfprune.report import write_report


__all__ = ["CellRun", "SharedWork", "SweepError", "SweepSummary", "load_sweep", "run_sweep"]

logger = logging.getLogger(__name__)


# -- shared work -------------------------------------------------------------------------------


class SharedWork:
    """What the cells of one sweep compute once: the parent, its scores, calibration tokens."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self._parent: Parent | None = None
        self._calibration: dict[str, torch.Tensor] = {}
        self._scores: dict[str, Any] = {}

    def parent(self, recipe: Recipe) -> Parent:
        # Every cell has the base recipe's parent section, so one load serves them all.
        if self._parent is None:
            self._parent = load_parent(recipe.parent)
        return self._parent

    def calibration(self, recipe: Recipe) -> torch.Tensor:
        key = recipe.fingerprint("calibration")
        if key not in self._calibration:
            spec = recipe.calibration
            tokenizer = self.parent(recipe).tokenizer
            self._calibration[key] = calibration_tokens(
                spec.dataset, tokenizer, spec.num_samples, spec.seq_len
            )
        return self._calibration[key]

    def scores(self, recipe: Recipe, pruner: Pruner, calibration: torch.Tensor | None) -> Any | None:
        """The method's scores for all of its ratios in the sweep, or None when it cannot share them."""
        key = json.dumps(
            [recipe.prune.method, recipe.prune.options, recipe.fingerprint("calibration", "seed")],
            sort_keys=True,
        )
        if key not in self._scores:
            ratios = [c.ratio for c in self.sweep.cells if c.recipe.prune.method == recipe.prune.method]
            parent = self.parent(recipe).model
            batch = recipe.calibration.batch_size
            self._scores[key] = pruner.score_for_ratios(parent, calibration, sorted(set(ratios)), batch)
        return self._scores[key]

    def figures(self) -> list[Path]:
        """The sweep report's PNGs (none before the first report)."""
        report = read_json(self.sweep.output_path / "report.json", {})
        return [self.sweep.output_path / name for name in report.get("plots", [])]


class CellRun(Run):
    """`Run` for one cell: the same stages, taking shared or sibling results where they are identical."""

    def __init__(self, cell: Cell, shared: SharedWork, *, publish: bool = False, force: bool = False):
        super().__init__(cell.recipe, force=force)
        self.cell, self.shared, self.publish = cell, shared, publish

    def stages(self, stop_after: str | None = None) -> tuple[str, ...]:
        # Training phase: everything but the push; publishing phase (after the sweep's report): the
        # cards, now with the report's plots, then the push.
        stages = super().stages(stop_after)
        if self.publish:
            return tuple(s for s in stages if s in {"card", "push"})
        return tuple(s for s in stages if s != "push")

    @property
    def parent(self) -> Parent:
        return self.shared.parent(self.recipe)

    def fingerprint(self, stage: str) -> str:
        base = super().fingerprint(stage)
        if stage in {"card", "push"}:
            return f"{base}-{_files_hash(self.shared.figures())}"
        return base

    # -- stages taking shared work -------------------------------------------------------------
    def stage_parent_eval(self) -> None:
        if not self._copy_scores("parent_eval", "parent"):
            super().stage_parent_eval()

    def stage_pruned_eval(self) -> None:
        if not self._copy_scores("pruned_eval", "pruned"):
            super().stage_pruned_eval()

    def stage_prune(self) -> None:
        donor = self._same_inputs_finished("prune")
        if donor is None:
            super().stage_prune()
            return
        logger.info("cell %s: pruned model shared with %s (hard links)", self.cell.id, donor.cell.id)
        with atomic_dir(self.pruned_dir) as tmp:
            _link_tree(donor.pruned_dir, tmp)

    def prune_parent(self, parent: Parent) -> PruneResult:
        """Prune a copy of the shared parent, from scores shared by the method's ratios when possible."""
        calibration = self.shared.calibration(self.recipe) if self.pruner.needs_calibration else None
        scores = self.shared.scores(self.recipe, self.pruner, calibration)
        model = copy.deepcopy(parent.model)
        if scores is None:
            return self.pruner.prune(
                model, calibration, self.recipe.prune.ratio, self.recipe.calibration.batch_size
            )
        start = time.perf_counter()
        result = self.pruner.apply(model, scores, self.recipe.prune.ratio)
        result.seconds = time.perf_counter() - start
        result.details["scores_shared_across_ratios"] = True
        return result

    def stage_train(self, run: str) -> None:
        if run == "scratch":
            key = self.twin_key()
            donor = key and self._finished_sibling("train_scratch", lambda sibling: sibling.twin_key() == key)
            if donor:
                self._take_scratch_from(donor)
                return
        super().stage_train(run)

    def card_figures(self) -> list[str]:
        names = []
        for figure in self.shared.figures():
            for kind in ("pruned", "continued", "scratch"):
                folder = self.model_dir(kind)
                if (folder / "config.json").is_file():
                    shutil.copyfile(figure, folder / figure.name)
            names.append(figure.name)
        return names

    # -- sharing between cells -------------------------------------------------------------------
    def twin_key(self) -> str | None:
        """What the scratch twin is made of: the pruned architecture, the masks, the training inputs.

        None when the twin keeps the parent's embeddings and norms (then it depends on which weights
        the method kept) or before the pruned model exists.
        """
        spec = self.recipe.train
        config_path = self.pruned_dir / "config.json"
        if spec is None or not spec.reinit_embeddings_and_norms or not config_path.is_file():
            return None
        config = json.loads(config_path.read_text())
        for incidental in ("_name_or_path", "transformers_version"):
            config.pop(incidental, None)
        masks = self.pruned_dir / "sparsity_masks.safetensors"
        parts = [
            json.dumps(config, sort_keys=True),
            _files_hash([masks]) if masks.is_file() else "dense",
            self.recipe.fingerprint("train", "eval", "seed"),
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _finished_sibling(self, stage: str, accept: Callable[[CellRun], bool]) -> CellRun | None:
        """Another cell of the sweep whose `stage` is finished and up to date, and that `accept`s."""
        for cell in self.shared.sweep.cells:
            if cell.id == self.cell.id:
                continue
            sibling = CellRun(cell, self.shared)
            current = sibling.ledger.is_current(stage, sibling.fingerprint(stage), *sibling.outputs(stage))
            if current and accept(sibling):
                return sibling
        return None

    def _same_inputs_finished(self, stage: str) -> CellRun | None:
        mine = self.fingerprint(stage)
        return self._finished_sibling(stage, lambda sibling: sibling.fingerprint(stage) == mine)

    def _copy_scores(self, stage: str, model: str) -> bool:
        """Take `model`'s scores from a cell that evaluated the same model the same way."""
        donor = self._same_inputs_finished(stage)
        scores = read_json(donor.metrics_path, {}).get(model) if donor else None
        if not scores:
            return False
        scores = {key: value for key, value in scores.items() if key != "hub"}  # the donor's own repos
        metrics = read_json(self.metrics_path, {})
        metrics[model] = {**metrics.get(model, {}), **scores}
        write_json(self.metrics_path, metrics)
        return True

    def _take_scratch_from(self, donor: CellRun) -> None:
        logger.info(
            "cell %s: scratch twin shared with %s (same architecture and inputs)", self.cell.id, donor.cell.id
        )
        with atomic_dir(self.model_dir("scratch")) as tmp:
            _link_tree(donor.model_dir("scratch"), tmp)
        trained = read_json(donor.metrics_path, {}).get("scratch", {})
        metrics = read_json(self.metrics_path, {})
        metrics["scratch"] = {
            **{k: trained[k] for k in ("tokens_trained", "training", "curve") if k in trained},
            "shared_from": donor.cell.id,
        }
        write_json(self.metrics_path, metrics)


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` into `target` (a copy where links are impossible). Outputs are
    always replaced by rename, never rewritten in place, so linked cells cannot change each other."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True)


def _files_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# -- running and planning ----------------------------------------------------------------------


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
        outcome = CellRun(cell, shared, force=force).execute()
        (summary.ran if any(o.ran for o in outcome.outcomes) else summary.up_to_date).append(cell.id)
    if distributed.is_main_process():
        summary.report = write_report(sweep.output_path)
    distributed.barrier()
    for cell in cells:
        CellRun(cell, shared, publish=True).execute()
    return summary
