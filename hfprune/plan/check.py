"""After the recipe's checks pass: the held-out warnings, and the plan that a run refuses to start without.

Called by `hfprune.checks.preflight` once the parent's config is read (before any weight loads or folder is
created). An evaluation set that reads calibration or training text (`hfprune.checks.heldout`) is a warning,
logged and returned (`hfprune validate` prints it). For `hfprune run`, `prune` and `sweep` every stage
is estimated and logged, and a `PlanError` (exit 2, naming the knob to turn) stops a run whose stage
needs more memory than the machine has, or whose remaining stages need more disk than the output folder's
file system has free (`hfprune.plan.disk`: a resumed run counts the stages still to run, a sweep all its
cells together), every problem in one report; their `--dry-run` prints the plan instead of refusing. The estimates are `hfprune.plan.estimate`'s; the machine is the one the command line
states (`--hardware`, `--device-memory`, `--host-memory`) or this one (`hfprune.plan.hardware`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

from hfprune.plan.disk import DiskNeed, disk_needs, disk_problems, size
from hfprune.plan.estimate import Plan, PlanError, format_table, plan_recipe, problems
from hfprune.plan.hardware import GIB, Hardware


Problem = tuple[str, str]


logger = logging.getLogger(__name__)


@dataclass
class Checked:
    """What the checks found that is not an error: held-out warnings, and the plans when asked for."""

    warnings: list[Problem] = field(default_factory=list)
    plans: dict[str | None, Plan] = field(default_factory=dict)  # by sweep cell id (None: a single run)
    disk: list[DiskNeed] = field(default_factory=list)  # all items together, per file system

    @property
    def plan(self) -> Plan | None:
        return self.plans.get(None)


def after_checks(
    items: list[tuple[str | None, Any]],
    configs: dict[str | None, Any],
    hardware: Hardware | None,
    *,
    refuse: bool,
    training: bool,
    log: bool = True,
    remaining: dict[str | None, Collection[str] | None] | None = None,
) -> Checked:
    """Held-out warnings (logged unless `log` is False: `validate` prints them), then the plans of the
    items whose parent config was read; `remaining` names each item's stages still to run (None: all),
    whose disk is checked against the free space."""
    from hfprune.checks.heldout import overlap_problems

    warned: dict[Problem, list[str | None]] = {}
    for label, recipe in items:
        for problem in overlap_problems(recipe):
            warned.setdefault(problem, []).append(label)
    checked = Checked([(key, in_cells(msg, labels, len(items))) for (key, msg), labels in warned.items()])
    for key, message in checked.warnings if log else ():
        logger.warning("%s: %s", key, message)
    if hardware is None:
        return checked
    stages = None if training else ("prune",)  # `hfprune prune` runs the prune stage (and its card)
    entries = []
    for label, recipe in items:
        if configs.get(label) is not None:
            plan = plan_for(recipe, configs[label], hardware, stages)
            entries.append((label, plan, recipe.output_path, (remaining or {}).get(label)))
            checked.plans[label] = replace(plan, disk=disk_needs(entries[-1:]))
    checked.disk = disk_needs(entries)
    # A dry run prints the plan itself.
    check_plans(list(checked.plans.items()), refuse=refuse, log=refuse, disk=checked.disk)
    return checked


def in_cells(message: str, labels: list[str | None], total: int) -> str:
    """`message` naming the sweep cells it applies to (unchanged for a single run)."""
    named = [label for label in labels if label is not None]
    if not named:
        return message
    return (
        f"{message} (all {total} cells)"
        if len(named) == total > 1
        else f"{message} (cells: {', '.join(named)})"
    )


def plan_for(recipe: Any, config: Any, hardware: Hardware, stages: Collection[str] | None = None) -> Plan:
    """The plan of `recipe` for the parent `config` on `hardware`, narrowed to `stages` (the stages the
    command runs: `hfprune prune` stops before training)."""
    plan = plan_recipe(recipe, config, hardware)
    if stages is None:
        return plan
    return replace(plan, stages=[s for s in plan.stages if s.name in stages])


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan for the dry run's JSON: per stage bytes and seconds, and whether (and why not) it fits."""
    found = problems(plan) + disk_problems(plan.disk)
    return {
        **plan.to_dict(),
        "fits": not found,
        "problems": [{"key": key, "message": message} for key, message in found],
    }


def peaks(plan: Plan) -> dict[str, Any]:
    """The largest device and host estimates over the stages and the summed time (a sweep cell's row)."""
    devices = [s.total("device") for s in plan.stages if s.total("device") is not None]
    seconds = [s.seconds for s in plan.stages if s.seconds is not None]
    return {
        "disk_bytes": sum(need.need for need in plan.disk) if plan.disk else None,
        "device_bytes": max(devices) if devices else None,
        "host_bytes": max((s.total("host") or 0) for s in plan.stages) if plan.stages else 0,
        "seconds": sum(seconds) if seconds else None,
    }


def check_plans(
    plans: list[tuple[str | None, Plan]], *, refuse: bool, log: bool = True, disk: list[DiskNeed] = ()
) -> None:
    """Log each plan and raise `PlanError` (exit 2) naming the knob of every stage that does not fit,
    and of every file system in `disk` with less free space than the plans' remaining stages need.

    `plans` pairs a sweep cell's id (None for a single run) with its plan; `refuse=False` (a dry run)
    only logs what would be refused.
    """
    found: list[tuple[str, str]] = []
    for label, plan in plans:
        if log:
            _log(label, plan)
        found += [(key, f"{message} (cell {label})" if label else message) for key, message in problems(plan)]
    found += disk_problems(disk)
    if found and refuse:
        raise PlanError(found)
    for key, message in found:
        logger.warning("plan: %s: %s", key, message)


def _log(label: str | None, plan: Plan) -> None:
    if label is None:
        logger.info("%s", format_table(plan))
        return
    peak = peaks(plan)
    device = "-" if peak["device_bytes"] is None else f"{peak['device_bytes'] / GIB:.2f} GiB"
    logger.info(
        "plan of cell %s: peak device %s, peak host %.2f GiB, disk left to use %s, %s",
        label,
        device,
        peak["host_bytes"] / GIB,
        "-" if peak["disk_bytes"] is None else size(peak["disk_bytes"]),
        "time unknown" if peak["seconds"] is None else f"{peak['seconds']:.0f} s of stage time",
    )
