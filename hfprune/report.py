"""`hfprune report DIR`: the comparison a run (or a folder of runs) answers, as tables and plots.

The last step after evaluation. It reads only the output contract (`recipe.yaml`, `metrics.json`,
`models/pruned/prune_report.json`) of every run under DIR, so it works on finished runs from any
machine, and writes `report.md`, `report.json` and PNG plots into DIR: one table per token budget
(method x ratio; pruned-before-training, continued and scratch scores and the continued-minus-scratch
gap), learning curves of continued vs scratch on the same token axis, and the gap against ratio and
against budget. Scores are held-out perplexity (lower is better), so a negative gap means the pruned
initialisation is ahead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


logger = logging.getLogger(__name__)


@dataclass
class RunRow:
    """One run: its grid coordinates, parameter count and the four scores on one evaluation set."""

    run: str
    method: str
    granularity: str
    ratio: float
    ratio_achieved: float | None
    budget: int | None
    params: int | None
    params_non_embedding: int | None
    metric: str
    parent: float | None
    pruned: float | None
    continued: float | None
    scratch: float | None
    tokens_trained: int | None
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    scratch_shared_from: str | None = None

    @property
    def gap(self) -> float | None:
        if self.continued is None or self.scratch is None:
            return None
        return self.continued - self.scratch


def find_runs(folder: Path) -> list[Path]:
    """`folder` itself when it is a run, otherwise every run folder below it (sorted)."""
    if (folder / "metrics.json").is_file():
        return [folder]
    return sorted(p.parent for p in folder.rglob("metrics.json") if (p.parent / "recipe.yaml").is_file())


def _score(metrics: dict[str, Any], model: str, metric: str) -> float | None:
    return metrics.get(model, {}).get("perplexity", {}).get(metric, {}).get("value")


def read_run(folder: Path) -> RunRow:
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    report_path = folder / "models" / "pruned" / "prune_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    sets = [p["name"] for p in recipe.get("eval", {}).get("perplexity", [])]
    metric = sets[0] if sets else "perplexity"
    train = recipe.get("train") or {}
    return RunRow(
        run=folder.name,
        method=recipe["prune"]["method"],
        granularity=report.get("granularity", "?"),
        ratio=recipe["prune"]["ratio"],
        ratio_achieved=report.get("ratio_achieved"),
        budget=train.get("token_budget"),
        params=report.get("params_after", {}).get("total"),
        params_non_embedding=report.get("params_after", {}).get("non_embedding"),
        metric=metric,
        parent=_score(metrics, "parent", metric),
        pruned=_score(metrics, "pruned", metric),
        continued=_score(metrics, "continued", metric),
        scratch=_score(metrics, "scratch", metric),
        tokens_trained=metrics.get("continued", {}).get("tokens_trained"),
        curves={
            run: metrics[run]["curve"] for run in ("continued", "scratch") if "curve" in metrics.get(run, {})
        },
        protocol=next(
            (
                metrics[m]["perplexity"][metric].get("protocol", {})
                for m in ("parent", "pruned", "continued", "scratch")
                if metric in metrics.get(m, {}).get("perplexity", {})
            ),
            {},
        ),
        scratch_shared_from=metrics.get("scratch", {}).get("shared_from"),
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _params(row: RunRow) -> str:
    if not row.params:
        return "-"
    if row.params_non_embedding is None:
        return f"{row.params / 1e6:.1f}M"
    return f"{row.params / 1e6:.1f}M ({row.params_non_embedding / 1e6:.1f}M)"


def describe_protocol(protocol: dict[str, Any]) -> str:
    """The evaluation protocol in words, from a perplexity result's `protocol` record."""
    if not protocol:
        return "protocol recorded in each run's metrics.json"
    dataset = protocol.get("dataset", {})
    source = dataset.get("data_files") or dataset.get("path", "?")
    split = f", split {dataset['split']}" if dataset.get("split") else ""
    return (
        f"`{source}`{split}: {protocol.get('windows', '?')} windows of {protocol.get('seq_len', '?')} tokens "
        f"({protocol.get('tokens', '?')} scored tokens){', BOS prepended' if protocol.get('bos') else ''}"
    )


def finding_lines(rows: list[RunRow]) -> list[str]:
    """Finding 1 of the study, checked per budget: does the pruned start beat random init, and by how much."""
    header = (
        "| training tokens | cells | continued beats scratch | median scratch / continued perplexity | "
        "median continued - scratch |"
    )
    lines = [
        header,
        "|---:|---:|---:|---:|---:|",
    ]
    budgets = sorted({r.budget for r in rows if r.gap is not None and r.budget})
    for budget in budgets:
        cells = [r for r in rows if r.budget == budget and r.gap is not None]
        wins = sum(r.gap < 0 for r in cells)
        ratios = sorted(r.scratch / r.continued for r in cells if r.continued)
        gaps = sorted(r.gap for r in cells)
        lines.append(
            f"| {budget:,} | {len(cells)} | {wins} of {len(cells)} | {_median(ratios):.1f}x | {_median(gaps):.2f} |"
        )
    return lines if budgets else []


def _median(values: list[float]) -> float:
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def budget_table(rows: list[RunRow]) -> list[str]:
    lines = [
        "| method | ratio (achieved) | params (non-embedding) | pruned | continued | scratch | continued - scratch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.method, r.ratio)):
        gap = _fmt(r.gap)
        if r.gap is not None and r.gap > 0:
            gap = f"**{gap} (scratch wins)**"
        achieved = f"{r.ratio} ({r.ratio_achieved:.3f})" if r.ratio_achieved is not None else str(r.ratio)
        scratch = _fmt(r.scratch) + (f" (twin of {r.scratch_shared_from})" if r.scratch_shared_from else "")
        lines.append(
            f"| {r.method} | {achieved} | {_params(r)} | {_fmt(r.pruned)} | {_fmt(r.continued)} | "
            f"{scratch} | {gap} |"
        )
    return lines


def render_markdown(rows: list[RunRow], plots: list[str]) -> str:
    metric = rows[0].metric
    parent = next((r.parent for r in rows if r.parent is not None), None)
    out = [
        "# hfprune report",
        "",
        (
            f"Score: held-out perplexity on `{metric}`, lower is better; {describe_protocol(rows[0].protocol)}. "
            f"Parent: {_fmt(parent)}. Parameters are the pruned model's total and, in brackets, non-embedding "
            "count (for sparse models, the weights left after masking); the scratch twin has the same count. "
            "A negative gap means the pruned initialisation beats random init trained on the same tokens."
        ),
    ]
    finding = finding_lines(rows)
    if finding:
        out += ["", "## Pruned vs random init, per budget", "", *finding]
    for budget in sorted({r.budget for r in rows}, key=lambda b: (b is None, b or 0)):
        title = f"{budget:,} training tokens" if budget else "no training"
        out += ["", f"## {title}", "", *budget_table([r for r in rows if r.budget == budget])]
    out += ["", *[f"![{name}]({name})" for name in plots]]
    return "\n".join(out) + "\n"


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
            colour = f"C{ratios.index(row.ratio)}"  # one colour per ratio: solid continued, dashed scratch
            for run, style in (("continued", "-"), ("scratch", "--")):
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
    ax.set(
        xlabel="pruning ratio" if x == "ratio" else "training tokens", ylabel="continued - scratch perplexity"
    )
    if x == "budget":
        ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(folder: Path) -> dict[str, Any]:
    """Write report.md, report.json and the plots into `folder`; return the report data."""
    runs = find_runs(folder)
    if not runs:
        raise FileNotFoundError(f"no hfprune run (metrics.json + recipe.yaml) under {folder}")
    rows = [read_run(run) for run in runs]
    plots = []
    if plot_curves(rows, folder / "curves.png"):
        plots.append("curves.png")
    for x in ("ratio", "budget"):
        if plot_gap(rows, x, folder / f"gap_vs_{x}.png"):
            plots.append(f"gap_vs_{x}.png")
    data = {"metric": rows[0].metric, "rows": [{**asdict(r), "gap": r.gap} for r in rows], "plots": plots}
    (folder / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(rows, plots))
    return data
