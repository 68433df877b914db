"""The paper's Figure 1 for a study's cells: the continued-vs-scratch gap against tokens, both settings.

Called by `hfprune.report.study.study_report`. One PNG, two panels: left, setting 1 (the random-init
twin on the same tokens); right, setting 2 (the twin on the whole pipeline's tokens). x is the token
budget of the model trained from the pruned weights (log axis: budgets span orders of magnitude); y is
the gap in nats, mean NLL(twin) - mean NLL(continued), the log of the perplexity ratio, so it reads the
same at any perplexity (positive: the pruned initialisation wins). Each point is a grid point's mean gap
over its seed replicates (`hfprune.report.seed_noise`); bars are ±1.96 seed standard errors (measured or
borrowed), or of the per-window paired differences where there is no seed noise at all. One line per
method and ratio: colour by method, style by ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hfprune.eval.perplexity import Z_95
from hfprune.report.seed_noise import StudyNoise


PANELS = {1: "setting 1: same tokens", 2: "setting 2: scratch on parent pretraining + x tokens"}
STYLES = ("-", "--", ":", "-.")


def plot_figure1(noise: StudyNoise, path: Path) -> list[dict[str, Any]]:
    """Write the figure to `path`; return each panel's setting, title and number of lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({group.method for group in noise.groups})
    ratios = sorted({group.ratio for group in noise.groups})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = []
    for ax, (setting, title) in zip(axes, PANELS.items(), strict=True):
        drawn = 0
        gaps = [(group, gap) for group in noise.groups if (gap := noise.gap(group, setting)) is not None]
        lines = sorted({(group.method, group.ratio) for group, _ in gaps})
        for index, (method, ratio) in enumerate(lines):
            points = sorted(
                (
                    (group.budget, gap)
                    for group, gap in gaps
                    if (group.method, group.ratio) == (method, ratio)
                ),
                key=lambda point: point[0],
            )
            # Lines sharing budgets would hide each other's bars: nudge each along the log axis.
            nudge = 1 + 0.025 * (index - (len(lines) - 1) / 2)
            ax.errorbar(
                [budget * nudge for budget, _ in points],
                [gap.value for _, gap in points],
                yerr=[Z_95 * (gap.seed_se if gap.seed_se is not None else gap.window_se or 0.0) for _, gap in points],
                color=f"C{methods.index(method) % 10}",
                linestyle=STYLES[ratios.index(ratio) % len(STYLES)],
                marker="o", markersize=3, capsize=2, label=f"{method}, ratio {ratio}",
            )  # fmt: skip
            drawn += 1
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set(title=title, xlabel="continued model's training tokens",
               ylabel="NLL(scratch) - NLL(continued), nats")  # fmt: skip
        if drawn:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="grey")
        panels.append({"setting": setting, "title": title, "lines": drawn})
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return panels
