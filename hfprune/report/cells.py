"""The cells of a study as `hfprune report` reads them: each trained cell's scores and gaps per setting.

One `StudyCell` per run folder of a sweep (`read_cell`): the held-out per-window NLLs of every kind
(`hfprune.eval.perplexity`: `window_nll`, `nll_se`), and per setting the gap

    gap = mean NLL(twin) - mean NLL(continued)   (nats: the log of the perplexity ratio)

which is positive when the pruned initialisation wins. Both models are scored on the same windows, so
the gap's standard error comes from the per-window differences (paired): the window noise. A cell is one
seed replicate; `hfprune.report.seed_noise` groups the replicates of a grid point and measures the seed
noise the verdicts use. `hfprune.report.study` builds the study section from these cells.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hfprune import kinds
from hfprune.eval.perplexity import Z_95, standard_error
from hfprune.pipeline.workspace import Workspace


@dataclass(frozen=True)
class Score:
    """One model's held-out score in one cell: mean NLL, its standard error over windows, each window's
    mean NLL (empty for results recorded before windows were kept), and the tokens it trained on."""

    nll: float
    se: float | None
    windows: tuple[float, ...]
    tokens_trained: int | None = None
    setting: int | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def interval_95(self) -> tuple[float, float] | None:
        if self.se is None:
            return None
        return math.exp(self.nll - Z_95 * self.se), math.exp(self.nll + Z_95 * self.se)


@dataclass(frozen=True)
class Gap:
    """A difference of mean NLLs with its standard error; `differences` are the per-window ones when
    the two sides were scored on the same windows (empty otherwise: the se is then unpaired)."""

    value: float
    se: float | None
    differences: tuple[float, ...] = ()

    @classmethod
    def paired(cls, left: tuple[float, ...], right: tuple[float, ...]) -> Gap | None:
        """mean(left - right) over the same windows; None unless both have the same windows."""
        if not left or len(left) != len(right):
            return None
        diffs = tuple(a - b for a, b in zip(left, right, strict=True))
        return cls(sum(diffs) / len(diffs), standard_error(diffs), diffs)

    @classmethod
    def between(cls, twin: Score, headline: Score) -> Gap:
        """NLL(twin) - NLL(headline): positive when the model trained from pruned weights is ahead."""
        paired = cls.paired(twin.windows, headline.windows)
        return paired or cls(twin.nll - headline.nll, _unpaired_se(twin.se, headline.se))

    def minus(self, other: Gap) -> Gap:
        """The change self - other (two cells scored on the same windows: paired per window)."""
        paired = Gap.paired(self.differences, other.differences)
        return paired or Gap(self.value - other.value, _unpaired_se(self.se, other.se))

    @property
    def direction(self) -> int:
        """+1 above zero beyond noise (more than 1.96 se), -1 below, 0 within noise. Without an error
        estimate (results from before windows were kept) the sign alone decides."""
        margin = Z_95 * (self.se or 0.0)
        return 1 if self.value > margin else -1 if self.value < -margin else 0

    def text(self) -> str:
        return f"{self.value:+.3f}" + ("" if self.se is None else f" ± {self.se:.3f}")

    def to_dict(self) -> dict[str, Any]:
        return {"gap": round(self.value, 6), "se": None if self.se is None else round(self.se, 6)}


def _unpaired_se(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else math.sqrt(a * a + b * b)


@dataclass(frozen=True)
class StudyCell:
    """One sweep cell: its grid coordinates, every kind's score, and which twin belongs to which setting."""

    run: str
    method: str
    granularity: str
    ratio: float
    budget: int
    pretrained_tokens: int | None
    scores: dict[str, Score]
    twins: dict[int, str]  # setting -> the random-init kind measured in that setting
    seed: int = 0  # the recipe's seed: one replicate of the pipeline (`hfprune.report.seed_noise`)

    def gap(self, setting: int) -> Gap | None:
        headline = self.scores.get(kinds.comparison()[0].name)
        twin = self.scores.get(self.twins.get(setting, ""))
        return None if headline is None or twin is None else Gap.between(twin, headline)

    def to_dict(self) -> dict[str, Any]:
        gaps = {f"setting_{s}": (g.to_dict() if (g := self.gap(s)) else None) for s in (1, 2)}
        tokens = {kind: score.tokens_trained for kind, score in self.scores.items() if score.tokens_trained}
        return {
            "run": self.run,
            "seed": self.seed,
            "method": self.method,
            "granularity": self.granularity,
            "ratio": self.ratio,
            "budget": self.budget,
            "pretrained_tokens": self.pretrained_tokens,
            "tokens_trained": tokens,
            "twins": {f"setting_{s}": kind for s, kind in self.twins.items()},
            **gaps,
        }


def granularity_of(method: str, recorded: str | None) -> str:
    """The method's granularity from the pruner registry; the one its prune report recorded otherwise."""
    from hfprune.pruners import UnknownPrunerError, get_method

    try:
        return str(get_method(method).granularity)
    except UnknownPrunerError:
        return recorded or "?"


def _score(entry: dict[str, Any], trained: dict[str, Any], kind: str) -> Score:
    windows = tuple(entry.get("window_nll") or ())
    nll = entry.get("protocol", {}).get("nll", math.log(entry["value"]))
    return Score(
        nll=nll,
        se=entry.get("nll_se", standard_error(windows)),
        windows=windows,
        tokens_trained=trained.get("tokens_trained"),
        setting=trained.get("setting", kinds.get(kind).setting),
    )


def read_cell(folder: Path) -> StudyCell:
    """A run folder's study view, from its output contract (recipe.yaml, metrics.json, prune report)."""
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    sets = [entry["name"] for entry in recipe.get("eval", {}).get("perplexity", [])]
    metric = sets[0] if sets else "perplexity"
    scores = {
        kind: _score(metrics[kind]["perplexity"][metric], metrics[kind], kind)
        for kind in kinds.names()
        if metric in metrics.get(kind, {}).get("perplexity", {})
    }
    # The plain random-init kinds (no recovery), each under the setting it recorded.
    twins = {
        score.setting: kind
        for kind, score in reversed(scores.items())  # registry order wins when two share a setting
        if kinds.get(kind).making is kinds.Making.FROM_TWIN and kinds.get(kind).recovery is None
    }
    parent = recipe.get("parent") or {}
    pretrained = metrics.get(kinds.PARENT.name, {}).get("pretrained_tokens") or parent.get(
        "pretrained_tokens"
    )
    report_path = Workspace(folder).pruned_dir / "prune_report.json"
    recorded = json.loads(report_path.read_text()).get("granularity") if report_path.is_file() else None
    return StudyCell(
        run=folder.name,
        method=recipe["prune"]["method"],
        granularity=granularity_of(recipe["prune"]["method"], recorded),
        ratio=recipe["prune"]["ratio"],
        budget=(recipe.get("train") or {}).get("token_budget") or 0,
        pretrained_tokens=pretrained or (parent.get("pretrain") or {}).get("token_budget"),
        scores=scores,
        twins={s: k for s, k in twins.items() if s is not None},
        seed=int(recipe.get("seed", 0)),
    )


def is_study(cells: list[StudyCell]) -> bool:
    """The cells hold the study's kinds: some cell measured both settings' gaps."""
    return any(cell.gap(1) is not None and cell.gap(2) is not None for cell in cells)


def is_trained_cell(run: Path) -> bool:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
    return bool(recipe.get("prune")) and bool((recipe.get("train") or {}).get("token_budget"))
