"""`hfprune report DIR`: the comparison a run (or a folder of runs) answers, as tables and plots.

The last step after evaluation. It reads only the output contract (`recipe.yaml`, `metrics.json`,
`models/pruned/prune_report.json`) of every run under DIR, so it works on finished runs from any
machine, and writes `report.md`, `report.json` and PNG plots into DIR: one table per token budget
(method x ratio; pruned-before-training, continued and scratch scores and the continued-minus-scratch
gap), learning curves of continued vs scratch on the same token axis, and the gap against ratio and
against budget. Scores are held-out perplexity (lower is better), so a negative gap means the pruned
initialisation is ahead. The models compared are the kinds of `hfprune.kinds` (one score column each),
and the gap is the one between the kind trained from the pruned weights and the one trained from the
random-init twin (`kinds.comparison()`). A study's sweep (cells with both settings' twins) also gets
the paper's Figure 1 and a findings table, one verdict per claim judged against seed noise, the seed
noise per kind and budget and the control beside the parent (`hfprune.report.study`); its per-budget
win count by sign is left out, and a control that disagrees heads the report.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from hfprune import kinds
from hfprune.report.plots import plot_curves, plot_gap
from hfprune.report.reader import RunRow, find_runs, read_run
from hfprune.report.study import StudySection, study_report


logger = logging.getLogger(__name__)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _params(row: RunRow) -> str:
    if not row.params:
        return "-"
    if row.params_non_embedding is None:
        return f"{row.params / 1e6:.1f}M"
    return f"{row.params / 1e6:.1f}M ({row.params_non_embedding / 1e6:.1f}M)"


def describe_protocol(protocol: dict[str, Any]) -> str:
    """The evaluation protocol in words, from a perplexity result's `protocol` record, with the documents
    its windows cover (`hfprune.eval.perplexity`) where the record has them."""
    if not protocol:
        return "protocol recorded in each run's metrics.json"
    dataset = protocol.get("dataset", {})
    source = dataset.get("data_files") or dataset.get("path", "?")
    split = f", split {dataset['split']}" if dataset.get("split") else ""
    covered = ""
    if protocol.get("documents_total") is not None:
        how = "spread over" if protocol.get("window_selection") == "spread" else "covering"
        limit = protocol.get("read_limit")
        read = f" of the first {limit:,} tokens read" if limit else ""
        covered = (
            f", {how} {protocol['documents_covered']:,} of {protocol['documents_total']:,} documents{read}"
        )
    return (
        f"`{source}`{split}: {protocol.get('windows', '?')} windows of {protocol.get('seq_len', '?')} tokens "
        f"({protocol.get('tokens', '?')} scored tokens){', BOS prepended' if protocol.get('bos') else ''}"
        f"{covered}"
    )


def finding_lines(rows: list[RunRow]) -> list[str]:
    """Per budget, how often the pruned start scored below random init, and by how much: a count by sign
    for ordinary reports. A study's report leaves it out: its claim 1 verdict (`hfprune.report.findings`)
    is the one, judged against seed noise."""
    headline, twin = (kind.name for kind in kinds.comparison())
    header = (
        f"| training tokens | cells | {headline} beats {twin} | median {twin} / {headline} perplexity | "
        f"median {headline} - {twin} |"
    )
    lines = [
        header,
        "|---:|---:|---:|---:|---:|",
    ]
    budgets = sorted({r.budget for r in rows if r.gap is not None and r.budget})
    for budget in budgets:
        cells = [r for r in rows if r.budget == budget and r.gap is not None]
        wins = sum(r.gap < 0 for r in cells)
        ratios = [r.score(twin) / r.score(headline) for r in cells if r.score(headline)]
        gaps = [r.gap for r in cells]
        lines.append(
            f"| {budget:,} | {len(cells)} | {wins} of {len(cells)} | {statistics.median(ratios):.1f}x | {statistics.median(gaps):.2f} |"
        )
    return lines if budgets else []


def budget_table(rows: list[RunRow]) -> list[str]:
    """Method x ratio at one budget: every kind's score but the parent's (it heads the report), then the gap."""
    headline, twin = (kind.name for kind in kinds.comparison())
    columns = shown_kinds(rows)
    # A setting-2 kind trained on the whole pipeline's tokens, not on this table's budget: its header says so.
    header = [f"{kind} (setting 2)" if kinds.get(kind).setting == 2 else kind for kind in columns]
    lines = [
        f"| method | ratio (achieved) | params (non-embedding) | {' | '.join(header)} | {headline} - {twin} |",
        "|---|---|---:|" + "---:|" * (len(columns) + 1),
    ]
    replicated = len({r.seed for r in rows}) > 1  # seed replicates: each row names its seed
    for r in sorted(rows, key=lambda r: (r.method, r.ratio, r.seed)):
        gap = _fmt(r.gap)
        if r.gap is not None and r.gap > 0:
            gap = f"**{gap} ({twin} wins)**"
        achieved = f"{r.ratio} ({r.ratio_achieved:.3f})" if r.ratio_achieved is not None else str(r.ratio)
        scores = [_fmt(r.score(kind)) for kind in columns]
        if r.twin_shared_from:
            scores[columns.index(twin)] += f" (twin of {r.twin_shared_from})"
        method = f"{r.method} (seed {r.seed})" if replicated else r.method
        lines.append(f"| {method} | {achieved} | {_params(r)} | {' | '.join(scores)} | {gap} |")
    return lines


def shown_kinds(rows: list[RunRow]) -> list[str]:
    """Score columns: every kind but the parent (it heads the report), the kinds trained only when asked
    (recovery kinds) only where some run measured them."""
    return [
        kind.name
        for kind in kinds.all_kinds()
        if kind.making is not kinds.Making.LOADED
        and (not kind.trained or kind.default_run or any(r.score(kind.name) is not None for r in rows))
    ]


def recovery_lines(rows: list[RunRow]) -> list[str]:
    """Every trained kind of each run side by side on one budget, against the random-init twin: what each
    recovery (plain, distillation, LoRA; from the pruned weights or from random init) reaches."""
    trained = [  # the same tokens: setting-2 kinds trained on more
        k for k in kinds.all_kinds() if k.setting == 1 and any(r.score(k.name) is not None for r in rows)
    ]
    if not any(k.recovery for k in trained):
        return []
    twin = kinds.comparison()[1].name
    lines = [
        f"| run | tokens | kind | starts from | recovery | perplexity | minus {twin} |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.budget or 0, r.run)):
        for kind in trained:
            score, base = r.score(kind.name), r.score(twin)
            if score is None:
                continue
            start = "pruned weights" if kind.making is kinds.Making.FROM_PRUNED else "random init"
            diff = "-" if base is None or kind.name == twin else f"{score - base:.2f}"
            budget = f"{r.budget:,}" if r.budget else "-"
            lines.append(
                f"| {r.run} | {budget} | {kind.name} | {start} | {kind.recovery or 'plain'} | {score:.2f} | {diff} |"
            )
    return lines


def render_markdown(rows: list[RunRow], plots: list[str], study: StudySection | None = None) -> str:
    """The report; a study's has its warnings under the title, its own section at the end and no
    per-budget win count (claim 1 has one verdict: the study's, judged against seed noise)."""
    metric = rows[0].metric
    loaded = kinds.made(kinds.Making.LOADED)[0].name
    parent = next((r.score(loaded) for r in rows if r.score(loaded) is not None), None)
    out = [
        "# hfprune report",
        *(line for warning in (study.warning if study else []) for line in ("", warning)),
    ]
    out += [
        "",
        (
            f"Score: held-out perplexity on `{metric}`, lower is better; {describe_protocol(rows[0].protocol)}. "
            f"Parent: {_fmt(parent)}. Parameters are the pruned model's total and, in brackets, non-embedding "
            "count (for sparse models, the weights left after masking); the scratch twin has the same count. "
            "A negative gap means the pruned initialisation beats random init trained on the same tokens."
        ),
    ]
    if any(kinds.get(kind).setting == 2 for kind in shown_kinds(rows)):
        out[-1] += (
            " Columns marked (setting 2) trained on the whole pipeline's tokens (the parent's pretraining "
            "tokens plus the budget); every other trained column on the budget alone (setting 1)."
        )
    finding = [] if study else finding_lines(rows)
    if finding:
        out += ["", "## Pruned vs random init, per budget", "", *finding]
    recovery = recovery_lines(rows)
    if recovery:
        out += ["", "## Recovery side by side (same tokens)", "", *recovery]
    for budget in sorted({r.budget for r in rows}, key=lambda b: (b is None, b or 0)):
        title = f"{budget:,} training tokens" if budget else "no training"
        out += ["", f"## {title}", "", *budget_table([r for r in rows if r.budget == budget])]
    out += ["", *[f"![{name}]({name})" for name in plots]]
    return "\n".join(out) + "\n" + (study.markdown if study else "")


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
    settings = {kind.name: kind.setting for kind in kinds.all_kinds() if kind.trained}
    data = {
        "metric": rows[0].metric,
        "settings": settings,
        "rows": [r.to_dict() for r in rows],
        "plots": plots,
    }
    study = study_report(folder, runs)  # the paper's claims and Figure 1, when the cells are a study's
    if study is not None:
        data.update(plots=plots + study.plots, study=study.data)
    (folder / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(rows, plots, study))
    return data
