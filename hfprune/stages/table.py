"""The stage table: every stage of a recipe, in order, with its declared inputs and outputs.

A stage's inputs are what its fingerprint is made of: recipe sections, the fingerprint of the stage
that made what it reads (`after`), and for the cards the scores and figures they show. A stage is
current when the ledger holds its fingerprint and its outputs exist; `hfprune.pipeline` runs the ones
that are not. The model stages come from the kind registry (`hfprune.kinds`): the parent is evaluated,
the pruned model is made by `prune`, each kind in `train.runs` by `train_<kind>`, and every kind has an
`<kind>_eval` stage after the one that made it.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from hfprune import kinds
from hfprune.kinds import Making, ModelKind
from hfprune.providers import Providers
from hfprune.pruners import Pruner, get_pruner
from hfprune.recipe import Recipe
from hfprune.stages import evaluate, prune, publish, train
from hfprune.workspace import Workspace


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


def _metrics(ws: Workspace) -> tuple[Path, ...]:
    return (ws.metrics.path,)


def _pruned_model(ws: Workspace) -> tuple[Path, ...]:
    return (ws.pruned_dir / "model.safetensors", ws.pruned_dir / "prune_report.json")


def _trained_model(kind: str, ws: Workspace) -> tuple[Path, ...]:
    return (ws.model_dir(kind) / "model.safetensors", ws.model_dir(kind) / "training_report.json")


def making_stage(kind: ModelKind) -> str | None:
    """The stage that makes a kind's model (None for the parent, which is loaded)."""
    if kind.making is Making.LOADED:
        return None
    return "prune" if kind.making is Making.PRUNED else f"train_{kind.name}"


def _model_stages(kind: ModelKind) -> list[Stage]:
    """The stage that makes `kind` (if any), then its evaluation."""
    made_by = making_stage(kind)
    eval_inputs = (after(made_by), sections("eval")) if made_by else (sections("parent", "eval"),)
    evaluation = Stage(
        f"{kind.name}_eval", functools.partial(evaluate.run, kind=kind.name), eval_inputs, _metrics
    )
    if kind.making is Making.LOADED:
        return [evaluation]
    if kind.making is Making.PRUNED:
        making = Stage(
            "prune", prune.run, (sections("parent", "prune", "calibration", "seed"),), _pruned_model
        )
    else:
        action = functools.partial(train.run, kind=kind.name)
        outputs = functools.partial(_trained_model, kind.name)
        making = Stage(made_by, action, (after("prune"), sections("train")), outputs, all_ranks=True)
    return [making, evaluation]


def stage_table(recipe: Recipe) -> dict[str, Stage]:
    """Every stage of `recipe`, in the order they run: kinds that are not trained in registry order,
    the trained ones in `train.runs` order, then the cards and (when enabled) the push."""
    untrained = [kind for kind in kinds.all_kinds() if not kind.trained]
    trained = [kinds.get(name) for name in (recipe.train.runs if recipe.train else [])]
    stages = [stage for kind in untrained + trained for stage in _model_stages(kind)]
    card_inputs = (
        after("prune"),
        sections("name", "eval", "output_dir", "train", "push"),
        shown_scores,
        shown_figures,
    )
    stages.append(Stage("card", publish.card, card_inputs, _pruned_model))
    if recipe.push.enabled:
        # What is published is the cards' folders: the push is stale exactly when they are.
        stages.append(Stage("push", publish.push, (tag("push"), after("card")), _metrics))
    return {stage.name: stage for stage in stages}


def make_pruner(recipe: Recipe) -> Pruner:
    pruner_cls = get_pruner(recipe.prune.method)
    return pruner_cls(pruner_cls.Options(**recipe.prune.options))


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
        cls, recipe: Recipe, providers: Providers | None = None, command: str | None = None
    ) -> Context:
        out = recipe.output_path
        # The resolved recipe reproduces the run exactly, whatever overrides produced it.
        command = command or shlex.join(["hfprune", "run", str(out / "recipe.yaml")])
        table = stage_table(recipe)
        return cls(recipe, Workspace(out), make_pruner(recipe), providers or Providers(), command, table)

    def fingerprint(self, stage: str) -> str:
        parts = (part(self) for part in self.table[stage].inputs)
        return "-".join(part for part in parts if part is not None)

    def is_current(self, stage: str, fingerprint: str | None = None) -> bool:
        fingerprint = fingerprint or self.fingerprint(stage)
        outputs = self.table[stage].outputs(self.workspace)
        return self.workspace.ledger.is_current(stage, fingerprint, *outputs)
