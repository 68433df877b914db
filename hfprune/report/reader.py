"""One run as `hfprune report` reads it: a `RunRow` from the output contract of a run folder.

`read_run` reads only `recipe.yaml`, `metrics.json` and `models/pruned/prune_report.json`, so it works
on finished runs from any machine; `hfprune.report.writer` turns the rows into tables and plots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hfprune import kinds
from hfprune.pipeline.workspace import Workspace


@dataclass
class RunRow:
    """One run: its grid coordinates, parameter count and each model kind's score on one evaluation set."""

    run: str
    method: str
    granularity: str
    ratio: float
    ratio_achieved: float | None
    budget: int | None
    params: int | None
    params_non_embedding: int | None
    metric: str
    scores: dict[str, float | None]
    tokens_trained: int | None
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    twin_shared_from: str | None = None
    seed: int = 0  # the recipe's seed: a sweep's seed replicates (`sweep.seed`) differ only here

    def score(self, kind: str) -> float | None:
        return self.scores.get(kind)

    @property
    def gap(self) -> float | None:
        headline, baseline = (self.score(kind.name) for kind in kinds.comparison())
        if headline is None or baseline is None:
            return None
        return headline - baseline

    def to_dict(self) -> dict[str, Any]:
        """report.json's row: the scores as one key per kind, after `metric`."""
        data: dict[str, Any] = {}
        for item in fields(self):
            if item.name == "scores":
                data.update(self.scores)
            elif item.name == "twin_shared_from":
                data[f"{kinds.comparison()[1].name}_shared_from"] = self.twin_shared_from
            else:
                data[item.name] = getattr(self, item.name)
        return {**data, "gap": self.gap}


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
    report_path = Workspace(folder).pruned_dir / "prune_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    sets = [p["name"] for p in recipe.get("eval", {}).get("perplexity", [])]
    metric = sets[0] if sets else "perplexity"
    train = recipe.get("train") or {}
    headline, twin = kinds.comparison()
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
        scores={kind: _score(metrics, kind, metric) for kind in kinds.names()},
        tokens_trained=metrics.get(headline.name, {}).get("tokens_trained"),
        curves={
            run: metrics[run]["curve"] for run in kinds.trained_names() if "curve" in metrics.get(run, {})
        },
        protocol=next(
            (
                metrics[m]["perplexity"][metric].get("protocol", {})
                for m in kinds.names()
                if metric in metrics.get(m, {}).get("perplexity", {})
            ),
            {},
        ),
        twin_shared_from=metrics.get(twin.name, {}).get("shared_from"),
        seed=int(recipe.get("seed", 0)),
    )
