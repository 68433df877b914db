"""The study part of `hfprune report`: the paper's Figure 1, its claims checked one by one, error bars.

Called by `hfprune.report.writer.write_report` with the run folders it found. When the cells of a sweep hold
the study's kinds (the model trained from the pruned weights and a random-init twin of setting 2, the
one trained on the whole pipeline's tokens), this module reads every cell's per-window held-out NLLs
(`hfprune.eval.perplexity`: `window_nll`, `nll_se`) and measures, per cell and setting, the gap

    gap = mean NLL(twin) - mean NLL(continued)   (nats: the log of the perplexity ratio)

which is positive when the pruned initialisation wins. Both models are scored on the same windows, so
each replicate's gap has a window noise from the per-window differences (paired); over the seed
replicates of a grid point `hfprune.report.seed_noise` measures the seed noise the verdicts are judged by
(borrowed, and said so, where a point has no replicates). `hfprune.report.control` sets the sweep's
control beside its parent. `hfprune.report.findings` turns the gaps into one verdict per claim of the
paper (its §1: same budget, the gap's sign and trends; pipeline budget, fine vs coarse granularity),
"not judged" throughout when the control disagrees; `hfprune.report.figure1` draws the two panels and
`hfprune.report.study_tables` writes the markdown. Setting 1 and 2 come from the `setting` each trained
kind recorded in metrics.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hfprune.eval.perplexity import Z_95
from hfprune.report.cells import is_study, is_trained_cell, read_cell
from hfprune.report.control import DISAGREES, read_controls
from hfprune.report.figure1 import plot_figure1
from hfprune.report.findings import check_claims
from hfprune.report.seed_noise import MIN_REPLICATES, StudyNoise, spread
from hfprune.report.study_tables import render_study


FIGURE = "figure1.png"
DISCUSSION = "discussion.md"


@dataclass(frozen=True)
class StudySection:
    """What the study adds to the report: its markdown, its report.json entry, its figure's name, and
    the lines that head the whole report (a control that disagrees with its parent)."""

    markdown: str
    data: dict[str, Any]
    plots: list[str]
    warning: list[str] = field(default_factory=list)


def study_report(folder: Path, runs: list[Path]) -> StudySection | None:
    """The study section of `folder`'s report (its figure written there); None when the cells are not a
    study's (then the report is the ordinary one, unchanged)."""
    cells = [read_cell(run) for run in runs if is_trained_cell(run)]
    if not is_study(cells):
        return None
    noise = StudyNoise(cells)
    control = read_controls(folder, cells)
    panels = plot_figure1(noise, folder / FIGURE)
    findings = check_claims(noise, control_disagrees=control is not None and control.status == DISAGREES)
    discussion_path = folder / DISCUSSION
    discussion = discussion_path.read_text().strip() if discussion_path.is_file() else None
    data = {
        "gap": "mean NLL(twin) - mean NLL(continued) in nats; positive: the pruned initialisation wins",
        "noise": (
            f"beyond noise: more than {Z_95} standard errors over the seed replicates (at least "
            f"{MIN_REPLICATES}) of the paired gap; points without replicates borrow the pooled seed noise "
            "of the replicated ones; the per-window paired se (window noise) is reported beside it"
        ),
        "seeds": noise.seeds,
        "seed_noise": spread(noise),
        "control": None if control is None else control.to_dict(),
        "findings": [finding.to_dict() for finding in findings],
        "points": [
            {
                **group.where(),
                **{f"setting_{s}": (g.to_dict() if (g := noise.gap(group, s)) else None) for s in (1, 2)},
            }
            for group in noise.groups
        ],
        "cells": [cell.to_dict() for cell in cells],
        "figure": {"file": FIGURE, "panels": panels},
        "discussion": discussion,
    }
    regimes = training_regimes(runs)
    data["training"] = regimes
    markdown = render_study(noise, findings, control, FIGURE, discussion, regimes)
    warning = []
    if control is not None and control.status == DISAGREES:
        warning = [
            (
                f"**The control disagrees with the parent: {control.summary()}. The pipeline does not train "
                "a model the way the parent was trained, so no claim is judged (every verdict: not judged).**"
            )
        ]
    return StudySection(markdown=markdown, data=data, plots=[FIGURE], warning=warning)


def training_regimes(runs: list[Path]) -> list[dict[str, Any]]:
    """How each model of the study trained, from the first trained cell's resolved recipe and metrics:
    the parent (its pretraining), the trained kinds and the control (which train with the `train`
    section): schedule, peak learning rate, tokens per step and data order."""
    run = next((r for r in runs if is_trained_cell(r)), None)
    if run is None:
        return []
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
    metrics = json.loads((run / "metrics.json").read_text())
    pretrain, train = (recipe.get("parent") or {}).get("pretrain"), recipe.get("train") or {}
    trained = [k for k in train.get("runs", []) if k in metrics]
    rows = []
    for models, section, record in (
        ("parent (pretraining)", pretrain, metrics.get("parent", {}).get("pretraining", {})),
        (
            ", ".join([*trained, "control"]),
            train,
            metrics.get(trained[0], {}).get("training", {}) if trained else {},
        ),
    ):
        if section:
            rows.append(
                {
                    "models": models,
                    "schedule": section.get("schedule") or {"type": "cosine"},
                    "learning_rate": (section.get("args") or {}).get("learning_rate"),
                    "tokens_per_step": record.get("tokens_per_step"),
                    "data_order": record.get("data_order"),
                }
            )
    return rows
