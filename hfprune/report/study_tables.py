"""The markdown of the study section of `report.md`: the findings table, the detail behind each claim,
the seed noise per kind and budget, the control beside the parent, Figure 1, the gap of every grid point
(seed and window noise side by side) and every model's perplexity with its 95% interval.

Called by `hfprune.report.study.study_report` with the study's noise (`hfprune.report.seed_noise`), the
findings (`hfprune.report.findings`) and the control check (`hfprune.report.control`); writes nothing
itself. Gaps are in nats (mean NLL of the random-init twin minus that of the model
trained from the pruned weights), so a positive gap means the pruned initialisation wins.
"""

from __future__ import annotations

from typing import Any

from hfprune import kinds
from hfprune.eval.perplexity import Z_95
from hfprune.report.cells import Score, StudyCell
from hfprune.report.control import ControlCheck
from hfprune.report.findings import Finding
from hfprune.report.seed_noise import MIN_REPLICATES, StudyNoise, spread


def render_study(
    noise: StudyNoise,
    findings: list[Finding],
    control: ControlCheck | None,
    figure: str,
    discussion: str | None,
    regimes: list[dict[str, Any]] | None = None,
) -> str:
    headline = kinds.comparison()[0].name
    out = [
        "",
        "## The paper's claims at this scale",
        "",
        reading_guide(noise),
        "",
        "| # | setting | claim | numbers at this scale | verdict |",
        "|---:|---:|---|---|---|",
        *(f"| {f.number} | {f.setting} | {f.claim} | {f.numbers} | **{f.verdict}** |" for f in findings),
    ]
    for finding in findings:
        table = detail_table(finding)
        if table:
            out += ["", f"Claim {finding.number} in detail:", "", *table]
    out += ["", "## Training", "", *regime_table(regimes or [])]
    out += ["", "## Seed noise", "", *spread_table(noise)]
    out += ["", "## Control", "", *control_lines(control)]
    out += [
        "",
        "## Figure 1",
        "",
        (
            "Left: setting 1 (same tokens); right: setting 2 (scratch on the whole pipeline's tokens). The mean "
            f"gap over the seed replicates against the {headline} model's token budget; bars are ±{Z_95} seed "
            "se (per-window se where no seed noise exists); colour: method, line style: ratio."
        ),
        "",
        f"![Figure 1: continued vs scratch gap, both settings]({figure})",
        "",
        "## Gap per cell",
        "",
        *gap_table(noise),
        "",
        "## Held-out perplexity with 95% intervals",
        "",
        *perplexity_table(noise.cells),
    ]
    if discussion:
        out += ["", "## Discussion", "", discussion]
    return "\n".join(out) + "\n"


def reading_guide(noise: StudyNoise) -> str:
    """What the gap is, what counts as beyond noise and how a verdict is reached."""
    headline = kinds.comparison()[0].name
    windows = max((len(s.windows) for cell in noise.cells for s in cell.scores.values()), default=0)
    paired = f"paired over the same {windows} held-out windows" if windows else "no per-window NLLs: unpaired"
    seeds = (
        f"{len(noise.seeds)} seeds ({', '.join(map(str, noise.seeds))}); {noise.replicated} of "
        f"{len(noise.groups)} cells replicated over at least {MIN_REPLICATES}"
    )
    return (
        f"Gap = mean NLL(random-init twin) - mean NLL({headline}) on the held-out set, in nats (the log of "
        "the perplexity ratio), averaged over the seed replicates (each replays the whole pipeline: parent, "
        "data order, initialisations); positive: the pruned initialisation wins. Setting 1: the twin trains "
        "on the same tokens; setting 2: on the whole pipeline's (the parent's pretraining + the same tokens). "
        f"Beyond noise: more than {Z_95} standard errors over the seed replicates (at least {MIN_REPLICATES}) "
        f"of the paired gap ({seeds}); cells without replicates borrow the pooled seed noise of the "
        "replicated ones, and say so. Window noise (the per-window differences, "
        f"{paired}) is shown beside it, never the criterion. Verdicts are computed from these numbers: "
        "supported when every group agrees, refuted when none does, mixed in between, not testable when the "
        "sweep holds no group the claim speaks of, not judged without seed noise or with a control that "
        "disagrees with its parent."
    )


def spread_table(noise: StudyNoise) -> list[str]:
    """Per budget and kind: the spread (sd) over seeds, pooled over the replicated cells, and the window se."""
    rows = spread(noise)
    if not any(row["seed_sd"] is not None for row in rows):
        return [
            f"No cell has {MIN_REPLICATES} or more seed replicates: no seed noise is measured (sweep.seed)."
        ]
    lines = [
        (
            "Spread over seeds of each kind's mean NLL and of each setting's gap (nats; sd pooled over the cells "
            f"with at least {MIN_REPLICATES} seeds), beside the median per-window standard error."
        ),
        "",
        "| budget | kind | seed sd | replicated cells | window se |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        sd = "-" if row["seed_sd"] is None else f"{row['seed_sd']:.3f}"
        window = "-" if row["window_se"] is None else f"{row['window_se']:.3f}"
        lines.append(f"| {row['budget']:,} | {row['kind']} | {sd} | {row['points']} | {window} |")
    return lines


def control_lines(control: ControlCheck | None) -> list[str]:
    """Each seed's control (the parent's shape trained from scratch on P tokens) beside its parent."""
    if control is None:
        return ["This sweep has no control (sweep.control): the pipeline is not checked against the parent."]
    lines = [
        (
            "The parent's own shape trained from scratch (another initialisation) on the parent's pretraining "
            "tokens through the train stage the twins use; gap = NLL(control) - NLL(parent), nats, ± window se."
        ),
        "",
        "| seed | parent | control | control - parent |",
        "|---:|---:|---:|---:|",
    ]
    for row in control.per_seed:
        parent = "-" if row["parent_perplexity"] is None else f"{row['parent_perplexity']:.2f}"
        lines.append(
            f"| {row['seed']} | {parent} | {row['control_perplexity']:.2f} | "
            f"{'-' if row['gap'] is None else _gap(row['gap'])} |"
        )
    return [*lines, "", f"**{control.summary()[0].upper()}{control.summary()[1:]}.**"]


def detail_table(finding: Finding) -> list[str]:
    """Per-group numbers behind claims 2 to 4 (claim 1's are the gap-per-cell table)."""
    if not finding.details or finding.number == 1:
        return []
    if finding.number == 4:
        lines = ["| granularity | method | ratio | budget | gap ± se | beyond noise | judged |", "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for d in finding.details:
            lines.append(
                f"| {d['granularity']} | {d['method']} | {d['ratio']} | {d['budget']:,} | {_gap(d)} | "
                f"{_direction(d['beyond_noise'])} | {'yes' if d['judged'] else 'no (width)'} |"
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
            f"{_gap(d['narrowing'])} | {_yes_no(d['narrowed'])} |"
        )
    return lines


def gap_table(noise: StudyNoise) -> list[str]:
    """Per cell (grid point): both settings' mean gap ± seed se (its source) and the window se beside."""
    headline = kinds.comparison()[0].name
    lines = [
        (
            f"| method | granularity | ratio | {headline} tokens | seeds | setting 1 gap ± seed se (windows) | "
            "setting 2 twin tokens | setting 2 gap ± seed se (windows) | seed noise |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group in noise.groups:
        gaps = [noise.gap(group, setting) for setting in (1, 2)]
        cell = next(iter(group.cells.values()))
        twin = cell.scores.get(cell.twins.get(2, ""))
        pipeline_tokens = f"{twin.tokens_trained:,}" if twin and twin.tokens_trained else "-"
        source = next((g.source or g.noise for g in gaps if g is not None), "-")
        lines.append(
            f"| {group.method} | {group.granularity} | {group.ratio} | {group.budget:,} | {len(group.cells)} | "
            f"{gaps[0].text() if gaps[0] else '-'} | {pipeline_tokens} | {gaps[1].text() if gaps[1] else '-'} | "
            f"{source} |"
        )
    return lines


def perplexity_table(cells: list[StudyCell]) -> list[str]:
    """Every model's perplexity with its 95% interval exp(nll ± 1.96 se), per seed replicate; the
    parent's once above (per seed when the replicates have their own)."""
    parent = kinds.PARENT.name
    shown = [k for k in kinds.names() if k != parent and any(k in c.scores for c in cells)]
    parents = {c.seed: c.scores[parent] for c in cells if parent in c.scores}
    lines = []
    if parents:
        each = [
            f"{_perplexity(score)}" + (f" (seed {seed})" if len(parents) > 1 else "")
            for seed, score in sorted(parents.items())
        ]
        lines = [f"Parent: {', '.join(each)}.", ""]
    lines += [
        f"| method | ratio | budget | seed | {' | '.join(shown)} |",
        "|---|---:|---:|---:|" + "---:|" * len(shown),
    ]
    for cell in sorted(cells, key=lambda c: (c.method, c.ratio, c.budget, c.seed)):
        values = [_perplexity(cell.scores[k]) if k in cell.scores else "-" for k in shown]
        lines.append(
            f"| {cell.method} | {cell.ratio} | {cell.budget:,} | {cell.seed} | {' | '.join(values)} |"
        )
    return lines


def _perplexity(score: Score) -> str:
    interval = score.interval_95()
    text = f"{score.perplexity:.2f}"
    return text if interval is None else f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _gap(entry: dict[str, Any]) -> str:
    """A gap with its seed se (the criterion) and, in brackets, its window se."""
    se, window = entry.get("se"), entry.get("window_se")
    text = f"{entry['gap']:+.3f}" + ("" if se is None else f" ± {se:.3f}")
    return text + ("" if window is None else f" (w {window:.3f})")


def _direction(value: int | None) -> str:
    return "not judged" if value is None else f"{value:+d}"


def _yes_no(value: bool | None) -> str:
    return "not judged" if value is None else "yes" if value else "no"


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def regime_table(regimes: list[dict[str, Any]]) -> list[str]:
    """One row per group of models that trained alike (`hfprune.report.study.training_regimes`)."""
    if not regimes:
        return ["(no training recorded)"]
    rows = [
        "Every model of one row trained alike; one schedule family for all when the rows agree.",
        "",
        "| models | schedule | peak learning rate | tokens per step | data order |",
        "|---|---|---:|---:|---|",
    ]
    for regime in regimes:
        schedule = ", ".join(f"{k} {v}" for k, v in regime["schedule"].items())
        rows.append(
            f"| {regime['models']} | {schedule} | {regime['learning_rate']} | {regime['tokens_per_step']} | "
            f"{regime['data_order']} |"
        )
    return rows
