"""What a stage is: a function of a `Context`, with declared inputs and outputs.

A stage's inputs are what its fingerprint is made of: recipe sections, the fingerprint of the stage
that made what it reads (`after`), and for the cards the scores and figures they show. A stage is
current when the ledger holds its fingerprint and its outputs exist. `hfprune.pipeline.runner` builds the
table of a recipe's stages from these pieces and runs the ones that are not current.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from hfprune.pipeline.providers import Providers
from hfprune.pipeline.workspace import Workspace
from hfprune.pruners import build_pruner
from hfprune.pruners.base import Pruner
from hfprune.recipe.schema import Recipe


Input = Callable[["Context"], "str | None"]


def sections(*names: str) -> Input:
    """Recipe sections the stage reads."""
    return lambda ctx: ctx.recipe.fingerprint(*names)


def after(stage: str) -> Input:
    """The stage that made what this one reads: its inputs are this one's too."""
    return lambda ctx: ctx.fingerprint(stage)


def tag(text: str) -> Input:
    return lambda ctx: text


def shown_scores(ctx: Context) -> str:
    """The scores in metrics.json (bar push records): the cards show them."""
    return ctx.workspace.metrics.scores_hash()


def shown_figures(ctx: Context) -> str | None:
    return ctx.providers.figures.fingerprint()


@dataclass(frozen=True)
class Stage:
    """One step of a run: `action(ctx)` makes `outputs(workspace)` from `inputs`."""

    name: str
    action: Callable[[Context], Any]
    inputs: tuple[Input, ...]
    outputs: Callable[[Workspace], tuple[Path, ...]]
    all_ranks: bool = False  # under torchrun: training is collective, everything else runs on rank 0


def metrics_file(ws: Workspace) -> tuple[Path, ...]:
    return (ws.metrics.path,)


def pruned_model(ws: Workspace) -> tuple[Path, ...]:
    return (ws.pruned_dir / "model.safetensors", ws.pruned_dir / "prune_report.json")


def trained_model(kind: str, ws: Workspace) -> tuple[Path, ...]:
    return (ws.model_dir(kind) / "model.safetensors", ws.model_dir(kind) / "training_report.json")


@dataclass
class Context:
    """What a stage works with: the recipe, its workspace, its pruner, its providers, and the models this
    process made in earlier stages (so an evaluation right after training reads no checkpoint)."""

    recipe: Recipe
    workspace: Workspace
    pruner: Pruner
    providers: Providers
    command: str
    table: dict[str, Stage]
    models: dict[str, PreTrainedModel] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        recipe: Recipe,
        table: dict[str, Stage],
        providers: Providers | None = None,
        command: str | None = None,
    ) -> Context:
        out = recipe.output_path
        # The resolved recipe reproduces the run exactly, whatever overrides produced it.
        command = command or shlex.join(["hfprune", "run", str(out / "recipe.yaml")])
        return cls(
            recipe,
            Workspace(out),
            build_pruner(recipe.prune.method, recipe.prune.options),
            providers or Providers(),
            command,
            table,
        )

    def fingerprint(self, stage: str) -> str:
        parts = (part(self) for part in self.table[stage].inputs)
        return "-".join(part for part in parts if part is not None)

    def is_current(self, stage: str, fingerprint: str | None = None) -> bool:
        fingerprint = fingerprint or self.fingerprint(stage)
        outputs = self.table[stage].outputs(self.workspace)
        return self.workspace.ledger.is_current(stage, fingerprint, *outputs)
