"""The `card` and `push` stages: model cards for every model folder, then the models on the Hub.

Cards are rendered after every evaluation (they show every model's scores side by side, and in a sweep
the report's figures); `hfprune card` runs the card stage alone on an existing folder. The push
publishes the kinds `hub.published_kinds` picks and records each commit in metrics.json, one kind at a
time, so a later failure keeps the URLs of the earlier ones; `hfprune push` runs it alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hfprune import __version__, kinds
from hfprune._faults import kill_point
from hfprune.hub import PushError, PushResult, parent_license, published_kinds, push_folder, repo_id_for
from hfprune.publish.cards import recorded_license, write_cards


if TYPE_CHECKING:
    from hfprune.pipeline.stages.base import Context


logger = logging.getLogger(__name__)


def card(ctx: Context) -> list[Path]:
    """Cards for every model folder of the run, each with every model's scores side by side."""
    ws = ctx.workspace
    license = recorded_license(ws.pruned_dir) or parent_license(ctx.recipe.parent)
    figures = ctx.providers.figures.place(ws)
    return write_cards(ws.root, ctx.recipe, ws.metrics.read(), license, ctx.command, figures)


def push(ctx: Context) -> dict[str, PushResult]:
    """Publish the run's models (see `hub.published_kinds`) and record each commit in metrics.json."""
    recipe, ws, spec = ctx.recipe, ctx.workspace, ctx.recipe.push
    if not spec.repo_prefix:
        raise PushError(
            "push.repo_prefix is not set: add it to the recipe, or pass push.repo_prefix=org/name"
        )
    chosen = published_kinds(spec.include_pruned, ws.saved_kinds())
    if not chosen:
        raise PushError(f"nothing to publish in {ws.models}: run the recipe first")
    if not any(kinds.get(kind).published_by_default for kind in chosen) and not spec.include_pruned:
        logger.info("this run trained no model: publishing the one-shot pruned model only")
    recipe_hash = recipe.fingerprint("name", "seed", "parent", "prune", "calibration", "train", "eval")
    results = {}
    for kind in chosen:
        result = results[kind] = push_folder(
            ws.model_dir(kind),
            repo_id_for(spec.repo_prefix, kind),
            private=spec.private,
            commit_message=f"hfprune {recipe.name}: {kind} model (recipe {recipe_hash})",
            commit_description=f"Made by `{ctx.command}` with hfprune {__version__}.",
            retries=spec.retries,
            retry_hint=f"publish them with `hfprune push {ws.root}`",
        )
        kill_point("push")  # the commit landed, its record not yet written
        ws.metrics.update(kind, hub=result.to_dict())  # per repo: a later failure keeps the earlier URLs
    return results
