"""The `pretrain` stage: the parent of a recipe with `parent.pretrain`, made before anything else.

The first row of such a recipe's stage table (`hfprune.pipeline.runner.stage_table`). The work is
`hfprune.training.pretrain.pretrain_parent`: it pretrains and publishes `parent.model`, or finds it already made
from the same inputs (a rerun, or a sweep's later cells: every cell shares one parent) and leaves it as
it is. Either way the stage records in metrics.json, under `parent`, the tokens it was pretrained on
(`pretrained_tokens`, the first part of the pipeline's budget) and its `pretraining` report. It runs on
every process under torchrun (the Trainer is collective); only the main process writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hfprune import distributed, kinds
from hfprune.training.pretrain import PRETRAINING_FILE, pretrain_parent


if TYPE_CHECKING:
    from hfprune.pipeline.stages.base import Context
    from hfprune.pipeline.workspace import Workspace
    from hfprune.recipe.schema import Recipe


def run(ctx: Context) -> None:
    record = pretrain_parent(ctx.recipe)
    if distributed.is_main_process():
        ctx.workspace.metrics.update(
            kinds.PARENT.name, pretrained_tokens=record["tokens_trained"], pretraining=record
        )


def outputs(recipe: Recipe, ws: Workspace) -> tuple[Path, ...]:
    """The parent's weights and pretraining record (wherever `parent.model` puts them), and metrics.json."""
    folder = Path(recipe.parent.model or "").expanduser()
    return (folder / "model.safetensors", folder / PRETRAINING_FILE, ws.metrics.path)


def record_declared_tokens(ctx: Context) -> None:
    """An external parent's pretraining tokens as its recipe declares them (`parent.pretrained_tokens`,
    from its card), in metrics.json; called by the parent's evaluation. A parent pretrained here has
    them recorded by this stage, from the training itself."""
    parent = ctx.recipe.parent
    if parent.pretrain is not None:
        return
    declared = {"pretrained_tokens": parent.pretrained_tokens} if parent.pretrained_tokens else {}
    recorded = ctx.workspace.metrics.get(kinds.PARENT.name)
    stale = [
        name for name in ("pretrained_tokens", "pretraining") if name in recorded and name not in declared
    ]
    if declared or stale:  # an earlier parent's pretraining is not this one's
        ctx.workspace.metrics.update(kinds.PARENT.name, drop=stale, **declared)
