"""The plots of `hfprune report`: learning curves per method, and the headline-minus-baseline gap.

Called by `hfprune.report.writer.write_report` with the rows it read; each function writes one PNG and says
whether there was anything to plot. Trained kinds (`hfprune.kinds`) get one line style each; the gap is
`RunRow.gap` (the kind trained from pruned weights minus the one trained from the random-init twin).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from hfprune import kinds


if TYPE_CHECKING:
    from hfprune.report.reader import RunRow


def plot_curves(rows: list[RunRow], path: Path) -> bool:
    """Figure-1-style panels: perplexity against tokens trained, continued vs scratch, one per method
    (per ratio, the largest budget's run)."""
    methods = sorted({r.method for r in rows if r.curves})
    if not methods:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(methods))
    grid_rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.5 * columns, 3.6 * grid_rows), squeeze=False)
    ratios = sorted({r.ratio for r in rows})
    for ax, method in zip(axes.flat, methods, strict=False):
        for row in _longest_per_ratio([r for r in rows if r.method == method and r.curves]):
            colour = f"C{ratios.index(row.ratio)}"  # one colour per ratio, one line style per trained kind
            for run, style in zip(
                kinds.trained_names(), itertools.cycle(("-", "--", ":", "-.")), strict=False
            ):
                points = row.curves.get(run, [])
                if points:
                    ax.plot([p["tokens"] for p in points], [p["perplexity"] for p in points], style,
                            color=colour, marker="o", markersize=3, label=f"{run}, ratio {row.ratio}")  # fmt: skip
        ax.set(title=method, xlabel="tokens trained", ylabel="held-out perplexity", yscale="log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _longest_per_ratio(rows: list[RunRow]) -> list[RunRow]:
    """Per ratio, the run with the largest budget: its curve passes the smaller budgets' token counts."""
    best: dict[float, RunRow] = {}
    for row in rows:
        if row.ratio not in best or (row.budget or 0) > (best[row.ratio].budget or 0):
            best[row.ratio] = row
    return [best[ratio] for ratio in sorted(best)]


def plot_gap(rows: list[RunRow], x: str, path: Path) -> bool:
    """The continued-minus-scratch gap against `ratio` or `budget`: one line per method and value of the
    other axis, so budgets are never mixed on a ratio plot (nor ratios on a budget plot)."""
    usable = [r for r in rows if r.gap is not None and getattr(r, x) is not None]
    if len({getattr(r, x) for r in usable}) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    other = "budget" if x == "ratio" else "ratio"
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method, fixed in sorted({(r.method, getattr(r, other)) for r in usable}, key=str):
        points = sorted(
            (getattr(r, x), r.gap) for r in usable if (r.method, getattr(r, other)) == (method, fixed)
        )
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", label=f"{method}, {other} {fixed}"
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    headline, twin = (kind.name for kind in kinds.comparison())
    ax.set(
        xlabel="pruning ratio" if x == "ratio" else "training tokens",
        ylabel=f"{headline} - {twin} perplexity",
    )
    if x == "budget":
        ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
