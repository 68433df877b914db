"""The study part of `hfprune report`: the paper's Figure 1, its claims checked one by one, error bars.

Called by `hfprune.report.writer.write_report` with the run folders it found. When the cells of a sweep hold
the study's kinds (the model trained from the pruned weights and a random-init twin of setting 2, the
one trained on the whole pipeline's tokens), this module reads every cell's per-window held-out NLLs
(`hfprune.eval.perplexity`: `window_nll`, `nll_se`) and measures, per cell and setting, the gap

    gap = mean NLL(twin) - mean NLL(continued)   (nats: the log of the perplexity ratio)

which is positive when the pruned initialisation wins. Both models are scored on the same windows, so
the gap's standard error comes from the per-window differences (paired), and so does the error of a
change in gap between two cells. `hfprune.report.findings` turns the gaps into one verdict per claim of
the paper (its §1: same budget, the gap's sign and trends; pipeline budget, fine vs coarse granularity),
`hfprune.report.figure1` draws the two panels and `hfprune.report.study_tables` writes the markdown.
Setting 1 and 2 come from the `setting` each trained kind recorded in metrics.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfprune.eval.perplexity import Z_95
from hfprune.report.cells import is_study, is_trained_cell, read_cell
from hfprune.report.figure1 import plot_figure1
from hfprune.report.findings import check_claims
from hfprune.report.study_tables import render_study


FIGURE = "figure1.png"
DISCUSSION = "discussion.md"


@dataclass(frozen=True)
class StudySection:
    """What the study adds to the report: its markdown, its report.json entry and its figure's name."""

    markdown: str
    data: dict[str, Any]
    plots: list[str]


def study_report(folder: Path, runs: list[Path]) -> StudySection | None:
    """The study section of `folder`'s report (its figure written there); None when the cells are not a
    study's (then the report is the ordinary one, unchanged)."""
    cells = [read_cell(run) for run in runs if is_trained_cell(run)]
    if not is_study(cells):
        return None
    panels = plot_figure1(cells, folder / FIGURE)
    findings = check_claims(cells)
    discussion_path = folder / DISCUSSION
    discussion = discussion_path.read_text().strip() if discussion_path.is_file() else None
    data = {
        "gap": "mean NLL(twin) - mean NLL(continued) in nats; positive: the pruned initialisation wins",
        "noise": f"beyond noise: more than {Z_95} standard errors of the per-window paired differences",
        "findings": [finding.to_dict() for finding in findings],
        "cells": [cell.to_dict() for cell in cells],
        "figure": {"file": FIGURE, "panels": panels},
        "discussion": discussion,
    }
    markdown = render_study(cells, findings, FIGURE, discussion)
    return StudySection(markdown=markdown, data=data, plots=[FIGURE])
