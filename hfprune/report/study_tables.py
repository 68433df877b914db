"""The markdown of the study section of `report.md`: the findings table, the detail behind each claim,
Figure 1, the gap of every cell and every model's perplexity with its 95% interval.

Called by `hfprune.report.study.study_report` with the cells and findings (`hfprune.report.findings`);
writes nothing itself. Gaps are in nats (mean NLL of the random-init twin minus that of the model
trained from the pruned weights), so a positive gap means the pruned initialisation wins.
"""

from __future__ import annotations

from typing import Any

from hfprune import kinds
from hfprune.eval.perplexity import Z_95
from hfprune.report.cells import Score, StudyCell
from hfprune.report.findings import Finding


def render_study(cells: list[StudyCell], findings: list[Finding], figure: str, discussion: str | None) -> str:
    headline = kinds.comparison()[0].name
    out = [
        "",
        "## The paper's claims at this scale",
        "",
        reading_guide(cells),
        "",
        "| # | setting | claim | numbers at this scale | verdict |",
        "|---:|---:|---|---|---|",
        *(f"| {f.number} | {f.setting} | {f.claim} | {f.numbers} | **{f.verdict}** |" for f in findings),
    ]
    for finding in findings:
        table = detail_table(finding)
        if table:
            out += ["", f"Claim {finding.number} in detail:", "", *table]
    out += [
        "",
        "## Figure 1",
        "",
        (
            "Left: setting 1 (same tokens); right: setting 2 (scratch on the whole pipeline's tokens). The gap "
            f"against the {headline} model's token budget; bars are ±{Z_95} se of the paired per-window "
            "differences; colour: method, line style: ratio."
        ),
        "",
        f"![Figure 1: continued vs scratch gap, both settings]({figure})",
        "",
        "## Gap per cell",
        "",
        *gap_table(cells),
        "",
        "## Held-out perplexity with 95% intervals",
        "",
        *perplexity_table(cells),
    ]
    if discussion:
        out += ["", "## Discussion", "", discussion]
    return "\n".join(out) + "\n"


def reading_guide(cells: list[StudyCell]) -> str:
    """What the gap is, what counts as beyond noise and how a verdict is reached."""
    headline = kinds.comparison()[0].name
    windows = max((len(s.windows) for cell in cells for s in cell.scores.values()), default=0)
    noise = f"paired over the same {windows} held-out windows" if windows else "no per-window NLLs: unpaired"
    return (
        f"Gap = mean NLL(random-init twin) - mean NLL({headline}) on the held-out set, in nats (the log of "
        "the perplexity ratio); positive: the pruned initialisation wins. Setting 1: the twin trains on the "
        "same tokens; setting 2: on the whole pipeline's (the parent's pretraining + the same tokens). "
        f"Beyond noise: more than {Z_95} standard errors of the per-window differences ({noise}). "
        "Verdicts are computed from these numbers: supported when every group agrees, refuted when none "
        "does, mixed in between, not testable when the sweep holds no group the claim speaks of."
    )


def detail_table(finding: Finding) -> list[str]:
    """Per-group numbers behind claims 2 to 4 (claim 1's are the gap-per-cell table)."""
    if not finding.details or finding.number == 1:
        return []
    if finding.number == 4:
        lines = ["| granularity | method | ratio | budget | gap ± se | beyond noise | judged |", "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for d in finding.details:
            lines.append(
                f"| {d['granularity']} | {d['method']} | {d['ratio']} | {d['budget']:,} | {_gap(d)} | "
                f"{d['beyond_noise']:+d} | {'yes' if d['judged'] else 'no (width)'} |"
            )
        return lines
    along = "budget" if "budget_from" in finding.details[0] else "ratio"
    fixed = "ratio" if along == "budget" else "budget"
    lines = [
        f"| method | {fixed} | {along} | gap at first | gap at last | narrowing ± se | narrowed beyond noise |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for d in finding.details:
        span = f"{_number(d[f'{along}_from'])} → {_number(d[f'{along}_to'])}"
        lines.append(
            f"| {d['method']} | {_number(d[fixed])} | {span} | {_gap(d['gap_from'])} | {_gap(d['gap_to'])} | "
            f"{_gap(d['narrowing'])} | {'yes' if d['narrowed'] else 'no'} |"
        )
    return lines


def gap_table(cells: list[StudyCell]) -> list[str]:
    headline = kinds.comparison()[0].name
    lines = [
        (
            f"| method | granularity | ratio | {headline} tokens | setting 1 gap ± se | setting 2 twin tokens | "
            "setting 2 gap ± se |"
        ),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for cell in sorted(cells, key=lambda c: (c.method, c.ratio, c.budget)):
        gaps = [cell.gap(setting) for setting in (1, 2)]
        twin = cell.scores.get(cell.twins.get(2, ""))
        pipeline_tokens = f"{twin.tokens_trained:,}" if twin and twin.tokens_trained else "-"
        lines.append(
            f"| {cell.method} | {cell.granularity} | {cell.ratio} | {cell.budget:,} | "
            f"{gaps[0].text() if gaps[0] else '-'} | {pipeline_tokens} | {gaps[1].text() if gaps[1] else '-'} |"
        )
    return lines


def perplexity_table(cells: list[StudyCell]) -> list[str]:
    """Every model's perplexity with its 95% interval exp(nll ± 1.96 se); the parent's once, above."""
    parent = kinds.made(kinds.Making.LOADED)[0].name
    shown = [k for k in kinds.names() if k != parent and any(k in c.scores for c in cells)]
    parents = [c.scores[parent] for c in cells if parent in c.scores]
    lines = [f"Parent: {_perplexity(parents[0])}.", ""] if parents else []
    lines += [
        f"| method | ratio | budget | {' | '.join(shown)} |",
        "|---|---:|---:|" + "---:|" * len(shown),
    ]
    for cell in sorted(cells, key=lambda c: (c.method, c.ratio, c.budget)):
        values = [_perplexity(cell.scores[k]) if k in cell.scores else "-" for k in shown]
        lines.append(f"| {cell.method} | {cell.ratio} | {cell.budget:,} | {' | '.join(values)} |")
    return lines


def _perplexity(score: Score) -> str:
    interval = score.interval_95()
    text = f"{score.perplexity:.2f}"
    return text if interval is None else f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _gap(entry: dict[str, Any]) -> str:
    se = entry.get("se")
    return f"{entry['gap']:+.3f}" + ("" if se is None else f" ± {se:.3f}")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)
