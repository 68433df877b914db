"""The only module that orders stages: recipe -> parent -> calibration -> pruned model -> train -> eval
-> cards -> push.

`stage_table` lists a recipe's stages (the functions of `hfprune.pipeline.stages`, each with its declared inputs
and outputs) in order, from the kind registry: the parent is evaluated, the pruned model is made by
`prune`, each kind in `train.runs` by `train_<kind>`, and every kind has an `<kind>_eval` stage after the
one that made it; then the cards and the push. `Pipeline` executes that table over the run's workspace
(`hfprune.pipeline.workspace`): each stage runs unless the ledger says its inputs are unchanged since it last
finished and its outputs exist (or `force`), and the parent is loaded lazily, so a rerun with nothing
changed never touches the weights. A sweep cell is the same `Pipeline`, handed the sweep's shared `Providers` and a selection of
stages. Outputs follow the output-folder layout of the README: `recipe.yaml`, `models/<kind>/`,
`metrics.json`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hfprune import distributed, kinds
from hfprune._faults import kill_point
from hfprune.architectures.base import SHAPE_KEYS
from hfprune.failures import translate_oom, writes_to
from hfprune.hub import PushResult, load_parent_config
from hfprune.kinds import Making, ModelKind
from hfprune.models.structure import count_config_parameters
from hfprune.pipeline.providers import Providers
from hfprune.pipeline.stages import evaluate, pretrain, prune, train
from hfprune.pipeline.stages.base import (
    Context,
    Stage,
    after,
    metrics_file,
    pruned_model,
    sections,
    shown_figures,
    shown_scores,
    tag,
    trained_model,
)
from hfprune.pipeline.stages.publish import card, push
from hfprune.pipeline.workspace import Workspace
from hfprune.plan.check import plan_summary
from hfprune.recipe.schema import Recipe


logger = logging.getLogger(__name__)

STOP_AFTER = {"prune": ("pretrain", "prune", "card")}


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
        f"{kind.name}_eval", functools.partial(evaluate.run, kind=kind.name), eval_inputs, metrics_file
    )
    if kind.making is Making.LOADED:
        return [evaluation]
    if kind.making is Making.PRUNED:
        making = Stage(
            "prune", prune.run, (sections("parent", "prune", "calibration", "seed"),), pruned_model
        )
    else:
        action = functools.partial(train.run, kind=kind.name)
        outputs = functools.partial(trained_model, kind.name)
        making = Stage(made_by, action, (after("prune"), sections("train")), outputs, all_ranks=True)
    return [making, evaluation]


def stage_table(recipe: Recipe) -> dict[str, Stage]:
    """Every stage of `recipe`, in the order they run: kinds that are not trained in registry order,
    the trained ones in `train.runs` order, then the cards and (when enabled) the push."""
    untrained = [kind for kind in kinds.all_kinds() if not kind.trained]
    trained = [kinds.get(name) for name in (recipe.train.runs if recipe.train else [])]
    stages = [stage for kind in untrained + trained for stage in _model_stages(kind)]
    if recipe.parent.pretrain is not None:
        stages = _pretrain_first(recipe, stages)
    card_inputs = (
        after("prune"),
        sections("name", "eval", "output_dir", "train", "push"),
        shown_scores,
        shown_figures,
    )
    stages.append(Stage("card", card, card_inputs, pruned_model))
    if recipe.push.enabled:
        # What is published is the cards' folders: the push is stale exactly when they are.
        stages.append(Stage("push", push, (tag("push"), after("card")), metrics_file))
    return {stage.name: stage for stage in stages}


def _pretrain_first(recipe: Recipe, stages: list[Stage]) -> list[Stage]:
    """A parent hfprune makes (`hfprune.pipeline.stages.pretrain`): made first, and its evaluation follows what the
    pretraining made (the seed too), not only the parent section."""
    made = functools.partial(pretrain.outputs, recipe)
    first = Stage("pretrain", pretrain.run, (sections("parent", "seed"),), made, all_ranks=True)
    parent_eval = f"{kinds.PARENT.name}_eval"
    return [first] + [
        replace(s, inputs=(*s.inputs, after("pretrain"))) if s.name == parent_eval else s for s in stages
    ]


def context_for(recipe: Recipe, providers: Providers | None = None, command: str | None = None) -> Context:
    """What `recipe`'s stages work with, its stage table included."""
    return Context.create(recipe, stage_table(recipe), providers, command)


@dataclass
class StageOutcome:
    stage: str
    ran: bool


@dataclass
class RunSummary:
    output_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """One execution of a recipe's stages against its output folder.

    `only` and `skip` narrow the stage list (a sweep runs its cells in two phases: everything but the
    push, then the cards and push once the sweep's report exists).
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        providers: Providers | None = None,
        force: bool = False,
        command: str | None = None,
        only: Collection[str] | None = None,
        skip: Collection[str] = (),
    ):
        self.context = context_for(recipe, providers, command)
        self.force = force
        self.only, self.skip = only, skip

    @property
    def workspace(self) -> Workspace:
        return self.context.workspace

    def stages(self, stop_after: str | None = None) -> tuple[str, ...]:
        """The stages this pipeline runs, in order; a recipe without `train` trains nothing."""
        names = STOP_AFTER[stop_after] if stop_after else tuple(self.context.table)
        names = tuple(s for s in names if s in self.context.table)
        return tuple(s for s in names if (self.only is None or s in self.only) and s not in self.skip)

    def status(self, stop_after: str | None = None) -> dict[str, str]:
        """Each stage and whether it would run (from the ledger and the recipe alone)."""
        return {
            s: "up to date" if self.context.is_current(s) else "will run" for s in self.stages(stop_after)
        }

    def execute(self, stop_after: str | None = None) -> RunSummary:
        """Run every stage that is not up to date.

        Under torchrun every process walks the same list; training stages run on all of them, every
        other stage on the main process only while the others wait, and only the main process writes.
        """
        summary = RunSummary(self.workspace.root)
        # A run starts here: whatever must hold for the whole run (the folder's lock, clearing what a
        # killed run left, checks before any work) belongs in `Workspace.session`.
        with self.workspace.session():
            summary.outcomes = [self._step(stage) for stage in self.stages(stop_after)]
            distributed.barrier()
        summary.metrics = self.workspace.metrics.read()
        return summary

    def _step(self, stage: str) -> StageOutcome:
        ctx, ws = self.context, self.workspace
        distributed.barrier()
        ws.ledger.reload()
        fingerprint = ctx.fingerprint(stage)
        if not self.force and ctx.is_current(stage, fingerprint):
            logger.info("stage %s: up to date, skipped", stage)
            return StageOutcome(stage, ran=False)
        if distributed.is_main_process() or ctx.table[stage].all_ranks:
            logger.info("stage %s: running", stage)
            kill_point(f"before:{stage}")
            # Out of memory, or a write fault whoever raises it (a full output folder or cache): one line
            # naming the stage's knobs, or the folder that is full and the fix.
            with translate_oom(stage), writes_to(ws.root):
                ctx.table[stage].action(ctx)
        kill_point(f"unrecorded:{stage}")  # its outputs written, the ledger not yet
        if distributed.is_main_process():
            ws.write_recipe(ctx.recipe.to_yaml())
            ws.ledger.record(stage, fingerprint)
        kill_point(f"after:{stage}")
        return StageOutcome(stage, ran=True)


def run(recipe: Recipe, *, force: bool = False, stop_after: str | None = None) -> RunSummary:
    """Run (or resume) a recipe; stages whose inputs are unchanged are skipped."""
    return Pipeline(recipe, force=force).execute(stop_after)


def publish(recipe: Recipe) -> dict[str, PushResult]:
    """Publish the models of an existing output folder (`hfprune push`): the push stage on its own."""
    context = context_for(recipe)
    with context.workspace.session():
        return push(context)


def render_cards(recipe: Recipe) -> list[Path]:
    """Re-render the cards of an existing output folder (`hfprune card`) from its metrics.json."""
    context = context_for(recipe)
    with context.workspace.session():
        return card(context)


def describe_plan(
    recipe: Recipe, stop_after: str | None = None, pipeline: Pipeline | None = None, plan: Any = None
) -> dict[str, Any]:
    """What a run would do, from configs only: stages (and whether they would run), paths, shapes, and
    with `plan` (`hfprune.plan.estimate.Plan`, made by preflight) per stage peak device and host memory and time."""
    pipeline = pipeline or Pipeline(recipe)
    ws = pipeline.workspace
    config = load_parent_config(recipe.parent)
    shape = pipeline.context.pruner.plan(config, recipe.prune.ratio)
    return {
        "output_dir": str(ws.root),
        "stages": pipeline.status(stop_after),
        "outputs": {
            "recipe": str(ws.recipe_path),
            kinds.PRUNED.name: str(ws.pruned_dir),
            "metrics": str(ws.metrics.path),
        },
        "parent_shape": {k: getattr(config, k, None) for k in SHAPE_KEYS},
        "target_shape": shape.config_changes,
        "params": {
            kinds.PARENT.name: count_config_parameters(config).to_dict(),
            kinds.PRUNED.name: shape.params_after.to_dict(),
        },
        "ratio": {"requested": recipe.prune.ratio, "achieved": round(shape.ratio_achieved, 6)},
        # Each trained kind's tokens: a setting-2 kind adds the parent's pretraining tokens.
        "token_budgets": {
            run: recipe.token_budget(run) for run in (recipe.train.runs if recipe.train else [])
        },
        **({"plan": plan_summary(plan)} if plan is not None else {}),
    }
