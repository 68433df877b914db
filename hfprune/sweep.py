"""`hfprune sweep RECIPE`: one recipe, a grid of runs over method x ratio x token budget.

Sits above the pipeline. `load_sweep` expands a recipe's `sweep:` section into ordinary recipes, one
per grid cell, each with its own output folder under the sweep's (the single-run output contract, so
`hfprune run <cell>/recipe.yaml` reproduces any cell alone). `run_sweep` runs the cells' stages with
`CellRun`, which takes from the rest of the sweep what it would otherwise recompute:

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
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from hfprune import distributed
from hfprune.data import calibration_tokens
from hfprune.hub import Parent, load_parent
from hfprune.outputs import atomic_dir, read_json, write_json
from hfprune.pipeline import Run, describe_plan
from hfprune.pruners import Pruner, PruneResult, UnknownPrunerError, get_pruner
from hfprune.pruners.base import Granularity
from hfprune.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    read_recipe_yaml,
    validate_recipe,
    validation_problems,
)
from hfprune.report import write_report


logger = logging.getLogger(__name__)

NO_CONTINUATION = (
    "trains from the start: the schedule is fitted to each budget (cosine to its floor when the budget "
    "is spent), so a smaller budget's last checkpoint is not a point on this run's schedule"
)
SELECTOR_KEYS = {
    "method": "method",
    "ratio": "ratio",
    "budget": "token_budget",
    "token_budget": "token_budget",
}


class SweepError(ValueError):
    """A bad `--only` selection; the message lists the grid's values."""


class SweepSpec(BaseModel):
    """The `sweep:` section: each axis replaces the base recipe's key of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: list[str] | None = Field(default=None, min_length=1, description="replaces prune.method")
    ratio: list[float] | None = Field(default=None, min_length=1, description="replaces prune.ratio")
    token_budget: list[PositiveInt] | None = Field(
        default=None, min_length=1, description="replaces train.token_budget"
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="prune.options per method, e.g. {minitron_width: {alignment: 8}}"
    )

    @field_validator("method", "ratio", "token_budget")
    @classmethod
    def _distinct(cls, values: list[Any] | None) -> list[Any] | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError("each value may appear once")
        return values


@dataclass(frozen=True)
class Cell:
    """One point of the grid and the complete recipe that runs it."""

    method: str
    ratio: float
    token_budget: int | None
    recipe: Recipe

    @property
    def id(self) -> str:
        return cell_id(self.method, self.ratio, self.token_budget)

    def value(self, axis: str) -> Any:
        return getattr(self, axis)


def cell_id(method: str, ratio: float, token_budget: int | None) -> str:
    """The cell's folder name, e.g. `wanda-r0.5-t16384`."""
    budget = f"-t{token_budget}" if token_budget is not None else ""
    return f"{method}-r{ratio:g}{budget}"


@dataclass(frozen=True)
class Sweep:
    name: str
    source: str
    output_path: Path
    cells: list[Cell]

    def axis(self, name: str) -> list[Any]:
        """The distinct values of one axis (method, ratio, token_budget), in grid order."""
        return list(dict.fromkeys(cell.value(name) for cell in self.cells))

    def select(self, selectors: Iterable[str] = ()) -> list[Cell]:
        """Cells matching any selector (`method=wanda,ratio=0.5`); all cells without selectors."""
        parsed = [self._parse_selector(text) for text in selectors]
        if not parsed:
            return list(self.cells)
        return [cell for cell in self.cells if any(_matches(cell, wanted) for wanted in parsed)]

    def _parse_selector(self, text: str) -> dict[str, Any]:
        wanted: dict[str, Any] = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            axis = SELECTOR_KEYS.get(key.strip())
            if not sep or axis is None:
                raise SweepError(f"--only {text!r}: expected key=value pairs with keys method, ratio, budget")
            values = self.axis(axis)
            match = next((v for v in values if _same(v, value.strip())), None)
            if match is None:
                listed = ", ".join(map(str, values))
                raise SweepError(f"--only {text!r}: {key} {value!r} is not in this sweep (it has: {listed})")
            wanted[axis] = match
        return wanted


def _same(grid_value: Any, text: str) -> bool:
    if isinstance(grid_value, float):
        try:
            return abs(grid_value - float(text)) < 1e-12
        except ValueError:
            return False
    return str(grid_value) == text


def _matches(cell: Cell, wanted: dict[str, Any]) -> bool:
    return all(cell.value(axis) == value for axis, value in wanted.items())


# -- loading -----------------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: Iterable[str] = ()) -> Sweep:
    """Read a sweep recipe, apply overrides and validate every cell; `RecipeError` lists all problems."""
    source = str(path)
    raw = read_recipe_yaml(path)
    problems = apply_overrides(raw, tuple(overrides))
    sweep_raw = raw.pop("sweep", None)
    if not isinstance(sweep_raw, dict):
        problems.append(
            ("sweep", "a sweep recipe needs a `sweep:` section (method, ratio, token_budget lists)")
        )
        raise RecipeError(source, problems)
    try:
        spec = SweepSpec.model_validate(sweep_raw)
    except ValidationError as err:
        raise RecipeError(source, problems + validation_problems(err, "sweep.")) from None
    axes, axis_problems = _axes(spec, raw)
    problems += axis_problems
    if problems:
        raise RecipeError(source, problems)
    name = str(raw.get("name", "sweep"))
    output = Path(raw.get("output_dir") or f"runs/{name}")
    cells, cell_problems = [], {}
    for method in axes["method"]:
        for ratio in axes["ratio"]:
            for budget in axes["token_budget"]:
                ident = cell_id(method, ratio, budget)
                cell_raw = _cell_raw(raw, spec, method, ratio, budget)
                cell_raw["name"], cell_raw["output_dir"] = f"{name}-{ident}", str(output / ident)
                try:
                    cells.append(Cell(method, ratio, budget, validate_recipe(cell_raw, source)))
                except RecipeError as err:
                    for problem in err.problems:
                        cell_problems.setdefault(problem, []).append(ident)
    if cell_problems:
        raise RecipeError(
            source, [(key, f"{msg} (cells: {', '.join(ids)})") for (key, msg), ids in cell_problems.items()]
        )
    return Sweep(name, source, output, cells)


def _axes(spec: SweepSpec, raw: dict[str, Any]) -> tuple[dict[str, list[Any]], list[tuple[str, str]]]:
    """Each axis from `sweep:` or, when not swept, the base recipe's single value."""
    prune = raw.get("prune") if isinstance(raw.get("prune"), dict) else {}
    train = raw.get("train") if isinstance(raw.get("train"), dict) else None
    problems: list[tuple[str, str]] = []
    axes: dict[str, list[Any]] = {}
    for axis, section, where in (("method", prune, "prune"), ("ratio", prune, "prune")):
        swept, base = getattr(spec, axis), section.get(axis)
        if swept is not None and base is not None:
            problems.append((f"{where}.{axis}", f"also given as sweep.{axis}: keep one"))
        elif swept is None and base is None:
            problems.append((f"sweep.{axis}", f"give a list here, or a single {where}.{axis}"))
        axes[axis] = swept if swept is not None else [base]
    if spec.token_budget is not None and train is None:
        problems.append(("sweep.token_budget", "needs a train section (the budgets are its token_budget)"))
    elif spec.token_budget is not None and "token_budget" in train:
        problems.append(("train.token_budget", "also given as sweep.token_budget: keep one"))
    axes["token_budget"] = spec.token_budget or ([train.get("token_budget")] if train else [None])
    if spec.method is not None and prune.get("options"):
        problems.append(("prune.options", "options are per method in a method sweep: sweep.options.<method>"))
    for method in spec.options:
        if method not in axes["method"]:
            problems.append((f"sweep.options.{method}", f"not a method of this sweep ({axes['method']})"))
    for index, method in enumerate(axes["method"] if spec.method else []):
        try:
            get_pruner(method)
        except UnknownPrunerError as err:
            problems.append((f"sweep.method.{index}", str(err)))
    return axes, problems


def _cell_raw(raw: dict[str, Any], spec: SweepSpec, method: str, ratio: float, budget: int | None) -> dict:
    cell = copy.deepcopy(raw)
    base_prune = cell.get("prune") if isinstance(cell.get("prune"), dict) else {}
    options = spec.options.get(method, base_prune.get("options") or {})
    cell["prune"] = {"method": method, "ratio": ratio, "options": options}
    if budget is not None:
        cell["train"]["token_budget"] = budget
    push = cell.get("push")
    if isinstance(push, dict) and push.get("repo_prefix"):
        push["repo_prefix"] = f"{push['repo_prefix']}-{cell_id(method, ratio, budget)}"
    return cell


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


def describe_sweep(sweep: Sweep, only: Iterable[str] = ()) -> dict[str, Any]:
    """The grid from configs alone: per cell its shape, parameter counts, budget and status."""
    cells = sweep.select(only)
    shared = SharedWork(sweep)
    plans = {cell.id: describe_plan(cell.recipe, runner=CellRun(cell, shared)) for cell in cells}
    smallest = min((c.token_budget for c in cells if c.token_budget), default=None)
    twins: dict[str, list[str]] = {}
    for cell in cells:
        key = _planned_twin_key(cell, plans[cell.id])
        if key:
            twins.setdefault(key, []).append(cell.id)
    rows = []
    for cell in cells:
        plan = plans[cell.id]
        states = set(plan["stages"].values())
        status = "finished" if states == {"up to date"} else "partial" if "up to date" in states else "to run"
        key = _planned_twin_key(cell, plan)
        rows.append(
            {
                "cell": cell.id,
                "method": cell.method,
                "ratio": cell.ratio,
                "ratio_achieved": plan["ratio"]["achieved"],
                "token_budget": cell.token_budget,
                "status": status,
                "output_dir": plan["output_dir"],
                "target_shape": plan["target_shape"],
                "params": plan["params"],
                "scratch_shared_with": [c for c in twins.get(key, []) if c != cell.id] if key else [],
                "budget": (
                    NO_CONTINUATION
                    if cell.token_budget and smallest and cell.token_budget > smallest
                    else "smallest budget of the sweep"
                    if cell.token_budget
                    else "no training"
                ),
            }
        )
    return {"sweep": sweep.name, "output_dir": str(sweep.output_path), "cells": rows}


def _planned_twin_key(cell: Cell, plan: dict[str, Any]) -> str | None:
    """Cells whose scratch twins will be the same model (dense methods with the same target shape)."""
    recipe = cell.recipe
    if recipe.train is None or "scratch" not in recipe.train.runs:
        return None
    if (
        not recipe.train.reinit_embeddings_and_norms
        or get_pruner(cell.method).granularity is Granularity.SPARSE
    ):
        return None
    return json.dumps([plan["target_shape"], recipe.fingerprint("train", "eval", "seed")], sort_keys=True)


def format_plan(plan: dict[str, Any]) -> str:
    """The dry-run plan as a table for people (the JSON goes to stdout for programs)."""
    lines = [
        f"sweep {plan['sweep']}: {len(plan['cells'])} cell(s) under {plan['output_dir']}",
        "| cell | status | shape | params (pruned, non-embedding) | ratio achieved | tokens | scratch shared with |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for row in plan["cells"]:
        shape = ", ".join(f"{k}={v}" for k, v in row["target_shape"].items()) or "parent shape, masked"
        pruned = row["params"]["pruned"]
        lines.append(
            f"| {row['cell']} | {row['status']} | {shape} | {pruned['non_embedding'] / 1e6:.2f}M | "
            f"{row['ratio_achieved']:.4f} | {row['token_budget'] or '-'} | {', '.join(row['scratch_shared_with']) or '-'} |"
        )
    if any(row["budget"] == NO_CONTINUATION for row in plan["cells"]):
        lines.append(f"Budgets above the smallest: each cell {NO_CONTINUATION}.")
    return "\n".join(lines)
