"""`hfprune sweep --dry-run`: the grid from configs alone, per cell its shape, parameters, budget, status.

With `sweep.seed` the plan lists the seed replicates (each seed's parent folder and cells, every cell
row its seed), and with `sweep.control` each seed's control (`hfprune.sweep.control`): its init seed,
parent, token budget P, schedule and status.

Each cell's row lists its trained kinds with their token budget and study setting (1: the budget of the
sweep; 2: the whole pipeline's, parent pretraining included). With `train.schedule.type: wsd` the plan
adds the branch plan (`hfprune.training.schedules.BranchPlan`): per stable run, its warmup, stable steps, each
budget's branch (branch step, decay steps), the tokens it trains in all and what it saves against
training every budget from the start.

Reads no weights, and each parent's config once (`hub.load_parent_config` keeps it): each cell's plan
comes from `pipeline.describe_plan` with the pipeline `hfprune sweep` runs for the cell (its shared
providers, every stage but the push), so its status (finished, partial, to run) is what `hfprune sweep`
would find; with the preflight's memory, disk and time plans (`hfprune.plan.check`), each cell's peaks
and the disk its remaining stages need, and the disk all cells still to run need together (per file
system, against its free space: what the sweep is refused on).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from hfprune import kinds
from hfprune.pipeline.runner import Pipeline, describe_plan
from hfprune.plan.check import peaks
from hfprune.plan.disk import size
from hfprune.plan.hardware import GIB
from hfprune.pruners import get_method
from hfprune.pruners.options import Granularity
from hfprune.seeds import Role, role_seed
from hfprune.sweep.control import control_spec, control_status
from hfprune.sweep.grid import Cell, Control, Sweep
from hfprune.sweep.runner import SharedWork
from hfprune.training.schedules import BranchPlan, stable_group


NO_CONTINUATION = (
    "trains from the start: the cosine schedule is fitted to each budget (to its floor when the budget "
    "is spent), so a smaller budget's last checkpoint is not a point on this run's schedule "
    "(train.schedule.type: wsd branches budgets from one stable run instead)"
)
BRANCHED = "a decay branch of its model's stable run (train.schedule.type: wsd; see the branch plan)"


def describe_sweep(
    sweep: Sweep, only: Iterable[str] = (), plans: dict[Any, Any] | None = None, disk: Iterable[Any] = ()
) -> dict[str, Any]:
    """The grid from configs alone: per cell its shape, parameter counts, budget and status, and with
    `plans` (`hfprune.plan.estimate.Plan` by cell id, from preflight) its memory, disk and time plan;
    `disk` (`hfprune.plan.disk.DiskNeed`s) is what the cells still to run need together."""
    cells = sweep.select(only)
    shared = SharedWork(sweep)
    memory = plans or {}
    plans = {
        cell.id: describe_plan(
            cell.recipe,
            pipeline=Pipeline(cell.recipe, providers=shared.providers(cell), skip=("push",)),
            plan=memory.get(cell.id),
        )
        for cell in cells
    }
    smallest = min((c.token_budget for c in cells if c.token_budget), default=None)
    twins: dict[str, list[str]] = {}
    for cell in cells:
        key = _planned_twin_key(cell, plans[cell.id])
        if key:
            twins.setdefault(key, []).append(cell.id)
    rows = []
    for cell in cells:
        key = _planned_twin_key(cell, plans[cell.id])
        shared_with = [c for c in twins.get(key, []) if c != cell.id] if key else []
        row = _row(cell, plans[cell.id], shared_with, smallest)
        rows.append({**row, "peaks": peaks(memory[cell.id]) if cell.id in memory else None})
    branch_plans = describe_branches(cells, plans)
    described = {
        "sweep": sweep.name,
        "output_dir": str(sweep.output_path),
        "seeds": seed_plan(sweep, cells),
        "controls": [describe_control(c) for c in sweep.controls if c.seed in {x.seed for x in cells}],
        "cells": rows,
    }
    described["disk"] = [need.to_dict() for need in disk]
    return {**described, "branch_plans": branch_plans} if branch_plans else described


def seed_plan(sweep: Sweep, cells: list[Cell]) -> list[dict[str, Any]]:
    """Per seed replicate: its parent folder and the cells it replays (the whole pipeline, seeded)."""
    plan = []
    for seed in sweep.seeds:
        mine = [cell for cell in cells if cell.seed == seed]
        if mine:
            parent = mine[0].recipe.parent.model
            plan.append({"seed": seed, "parent": parent, "cells": len(mine), "methods": _methods(mine)})
    return plan


def _methods(cells: list[Cell]) -> list[str]:
    return list(dict.fromkeys(cell.method for cell in cells))


def describe_control(control: Control) -> dict[str, Any]:
    """The control of one seed: the parent's shape from scratch on its P tokens, with the twins' train."""
    spec = control_spec(control)
    return {
        "control": control.id,
        "seed": control.seed,
        "init_seed": role_seed(control.seed, Role.CONTROL_INIT),
        "output_dir": str(control.output_path),
        "parent": control.recipe.parent.model,
        "token_budget": spec.token_budget,
        "schedule": spec.schedule.type,
        "status": control_status(control),
    }


def _row(cell: Cell, plan: dict[str, Any], shared_with: list[str], smallest: int | None) -> dict[str, Any]:
    """One cell of the dry run: what `describe_plan` says of it, its status and its budget's note."""
    states = set(plan["stages"].values())
    status = "finished" if states == {"up to date"} else "partial" if "up to date" in states else "to run"
    return {
        "cell": cell.id,
        "seed": cell.seed,
        "method": cell.method,
        "ratio": cell.ratio,
        "ratio_achieved": plan["ratio"]["achieved"],
        "token_budget": cell.token_budget,
        "status": status,
        "output_dir": plan["output_dir"],
        "target_shape": plan["target_shape"],
        "params": plan["params"],
        "scratch_shared_with": shared_with,
        "trained": [
            {"kind": k, "token_budget": cell.recipe.token_budget(k), "setting": kinds.get(k).setting}
            for k in (cell.recipe.train.runs if cell.recipe.train else [])
        ],
        "plan": plan.get("plan"),
        "budget": (
            BRANCHED
            if cell.recipe.train and cell.recipe.train.schedule.type == "wsd"
            else NO_CONTINUATION
            if cell.token_budget and smallest and cell.token_budget > smallest
            else "smallest budget of the sweep"
            if cell.token_budget
            else "no training"
        ),
    }


def _planned_twin_shape(cell: Cell, plan: dict[str, Any]) -> str | None:
    """A twin's architecture as far as the configs tell before pruning, the planned side of
    `hfprune.pipeline.providers.twin_shape`: the target shape of a dense method whose twin re-initialises
    everything; None when what the twin is made of depends on the pruned weights (sparse masks, or kept
    embeddings and norms), so only the real run can say which twins are the same model."""
    if (
        cell.recipe.train is None
        or not cell.recipe.train.reinit_embeddings_and_norms
        or get_method(cell.method).granularity is Granularity.SPARSE
    ):
        return None
    return "shape:" + json.dumps(plan["target_shape"], sort_keys=True)


def _planned_twin_key(cell: Cell, plan: dict[str, Any]) -> str | None:
    """Cells whose random-init twins will be the same model (the planned `hfprune.sweep.runner.twin_key`)."""
    twins = [kind.name for kind in kinds.made(kinds.Making.FROM_TWIN)]
    shape = _planned_twin_shape(cell, plan)
    if shape is None or not set(twins) & set(cell.recipe.train.runs):
        return None
    return json.dumps([shape, cell.recipe.fingerprint("train", "eval", "seed")])


def describe_branches(cells: list[Cell], plans: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The branch plan of the cells that train with wsd: one entry per stable run, with the budgets of
    every cell and kind sharing it (twins of dense methods with one target shape share one)."""
    groups: dict[str, dict[str, Any]] = {}
    for cell in cells:
        train = cell.recipe.train
        for kind in train.runs if train is not None and train.schedule.type == "wsd" else []:
            key = stable_group(cell.recipe, kind, _planned_start(cell, kind, plans[cell.id]))
            group = groups.setdefault(key, {"kinds": [], "models": [], "cells": [], "budgets": []})
            group["spec"] = cell.recipe.train_spec(kind)
            for field, value in (
                ("kinds", kind),
                ("models", f"{cell.method}-r{cell.ratio:g}"),
                ("cells", cell.id),
            ):
                if value not in group[field]:
                    group[field].append(value)
            group["budgets"].append(cell.recipe.token_budget(kind))
    described = []
    for key, group in groups.items():
        plan = BranchPlan.for_budgets(group.pop("spec"), group.pop("budgets"))
        described.append({"stable_run": key, **group, **plan.to_dict()})
    return described


def _planned_start(cell: Cell, kind: str, plan: dict[str, Any]) -> str | None:
    """A twin's starting model as the runs will key it (`hfprune.training.branches.starting_identity`): its
    planned shape; None: the prune stage's inputs (the pruned weights, or a twin they shape)."""
    if kinds.get(kind).making is not kinds.Making.FROM_TWIN:
        return None
    return _planned_twin_shape(cell, plan)


def format_plan(plan: dict[str, Any]) -> str:
    """The dry-run plan as a table for people (the JSON goes to stdout for programs)."""
    lines = [
        f"sweep {plan['sweep']}: {len(plan['cells'])} cell(s) under {plan['output_dir']}",
        (
            "| cell | status | shape | params (pruned, non-embedding) | ratio achieved | tokens "
            "| trained: kind tokens (setting) | scratch shared with | peak device | peak host | disk to use "
            "| stage time |"
        ),
        "|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in plan["cells"]:
        shape = ", ".join(f"{k}={v}" for k, v in row["target_shape"].items()) or "parent shape, masked"
        pruned = row["params"][kinds.PRUNED.name]
        trained = (
            ", ".join(f"{t['kind']} {t['token_budget']} ({t['setting']})" for t in row["trained"]) or "-"
        )
        lines.append(
            f"| {row['cell']} | {row['status']} | {shape} | {pruned['non_embedding'] / 1e6:.2f}M | "
            f"{row['ratio_achieved']:.4f} | {row['token_budget'] or '-'} | {trained} | "
            f"{', '.join(row['scratch_shared_with']) or '-'} | "
            f"{_peaks(row.get('peaks'))} |"
        )
    lines += [
        f"Disk: the cells still to run need {size(need['need_bytes'])} on the disk of {need['folder']} "
        f"({size(need['free_bytes'])} free{'' if need['fits'] else ': DOES NOT FIT'})."
        for need in plan.get("disk", [])
    ]
    if any(row["budget"] == NO_CONTINUATION for row in plan["cells"]):
        lines.append(f"Budgets above the smallest: each cell {NO_CONTINUATION}.")
    lines += _seed_lines(plan.get("seeds", [])) + _control_lines(plan.get("controls", []))
    return "\n".join(lines + _branch_lines(plan.get("branch_plans", [])))


def _seed_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """The seed replicates: each replays the whole pipeline (parent, data order, initialisations)."""
    if len(seeds) < 2:
        return []
    lines = ["", f"Seed replicates: {len(seeds)}, each with its own parent, data order and initialisations."]
    lines += ["| seed | parent | cells | methods |", "|---:|---|---:|---|"]
    lines += [f"| {s['seed']} | {s['parent']} | {s['cells']} | {', '.join(s['methods'])} |" for s in seeds]
    return lines


def _control_lines(controls: list[dict[str, Any]]) -> list[str]:
    """The controls (`sweep.control`): the parent's shape from scratch on its own P tokens, per seed."""
    if not controls:
        return []
    lines = [
        "",
        (
            "Controls (sweep.control): the parent's shape trained from scratch (another init seed) on the "
            "parent's pretraining tokens through the train stage; the report compares each with its parent."
        ),
        "| control | seed | init seed | parent | tokens | schedule | status |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    lines += [
        f"| {c['control']} | {c['seed']} | {c['init_seed']} | {c['parent']} | {c['token_budget']} | "
        f"{c['schedule']} | {c['status']} |"
        for c in controls
    ]
    return lines


def _branch_lines(branch_plans: list[dict[str, Any]]) -> list[str]:
    """The branch plan as a table: per stable run its warmup, stable phase, branches and tokens."""
    if not branch_plans:
        return []
    lines = [
        "",
        "Branch plan (train.schedule.type: wsd): one stable run per model, a decay branch per budget.",
        (
            "| stable run | kinds | models | warmup steps | stable steps (tokens) "
            "| branches: budget @ branch step + decay steps | tokens | from the start | saved |"
        ),
        "|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for group in branch_plans:
        branches = ", ".join(
            f"{b['budget']} @ {b['branch_step']} + {b['decay_steps']}" for b in group["branches"]
        )
        lines.append(
            f"| {group['stable_run']} | {', '.join(group['kinds'])} | {', '.join(group['models'])} | "
            f"{group['warmup_steps']} | {group['stable_steps']} ({group['stable_tokens']}) | {branches} | "
            f"{group['total_tokens']} | {group['from_start_tokens']} | {group['saved_tokens']} |"
        )
    total = sum(g["total_tokens"] for g in branch_plans)
    from_start = sum(g["from_start_tokens"] for g in branch_plans)
    lines.append(
        f"In all: {total} training tokens instead of {from_start} from the start "
        f"({from_start - total} saved, {100 * (from_start - total) / from_start:.0f}%)."
    )
    return lines


def _peaks(peak: dict[str, Any] | None) -> str:
    """A cell's largest device and host estimates and its summed stage time, as three table cells."""
    if peak is None:
        return "- | - | - | -"
    disk = "-" if peak.get("disk_bytes") is None else size(peak["disk_bytes"])
    device = "-" if peak["device_bytes"] is None else f"{peak['device_bytes'] / GIB:.1f} GiB"
    seconds = peak["seconds"]
    time = "-" if seconds is None else f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"
    return f"{device} | {peak['host_bytes'] / GIB:.1f} GiB | {disk} | {time}"
