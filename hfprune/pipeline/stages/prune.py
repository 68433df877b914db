"""The `prune` stage: calibrate, score, prune the parent, and save the pruned model with its report.

The one path every pruner takes, in a single run and in a sweep cell alike: scores come from the
score provider (computed for this run's ratio, or shared by a sweep across the method's ratios) and
`pruner.apply` builds the model from them. A method whose scores depend on the ratio itself
(sequential sparse pruning calibrates each layer on the already-pruned layers before it) declares so by
giving no scores, and its own `pruner.prune` runs instead. The folder `models/pruned/` holds the
checkpoint, the tokenizer, the sparsity masks if any, `prune_report.json` and the card.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from hfprune import __version__, kinds
from hfprune.architectures.base import SHAPE_KEYS, ParamCount
from hfprune.architectures.registry import architecture_of
from hfprune.hub import Parent, parent_license
from hfprune.masks.parent import carry_parent_masks
from hfprune.models.placement import log_stage
from hfprune.models.structure import count_parameters
from hfprune.outputs import atomic_dir, write_json, write_text
from hfprune.pipeline.workspace import MASKS_FILE
from hfprune.pruners import METHODS
from hfprune.pruners.base import PruneResult
from hfprune.pruners.options import Granularity
from hfprune.publish.cards import render_pruned_card


if TYPE_CHECKING:
    from hfprune.pipeline.stages.base import Context


def run(ctx: Context) -> None:
    kind = kinds.PRUNED.name
    if ctx.providers.donors.link_model(ctx, "prune", kind):
        return
    parent = ctx.providers.parent.get(ctx.recipe)
    # Calibration and surgery run where the parent was placed (`hfprune.models.placement`, on loading).
    log_stage("prune", parent.model)
    parent_config = parent.model.config.to_dict()
    before = count_parameters(parent.model)
    result = prune_model(ctx, parent)  # may consume the parent's model: parent_eval runs first
    ctx.models[kind] = result.model
    report = prune_report(ctx, result, parent_config, before)
    with atomic_dir(ctx.workspace.pruned_dir) as tmp:
        result.model.save_pretrained(tmp)
        parent.tokenizer.save_pretrained(tmp)
        if result.masks:
            from hfprune.masks.storage import save_masks

            save_masks(result.masks, tmp / MASKS_FILE)
        write_json(tmp / "prune_report.json", report)
        metrics = ctx.workspace.metrics.read()
        card = render_pruned_card(ctx.recipe, report, metrics, parent_license(ctx.recipe.parent), ctx.command)
        write_text(tmp / "README.md", str(card))


def prune_model(ctx: Context, parent: Parent) -> PruneResult:
    """Calibrate and prune, timed: scores from the provider, then `pruner.apply` (see the module note)."""
    recipe, pruner = ctx.recipe, ctx.pruner
    calibration = None
    if pruner.needs_calibration:
        calibration = ctx.providers.scores.calibration(recipe, parent.tokenizer)
    start = time.perf_counter()
    scores = ctx.providers.scores.scores(recipe, pruner, parent.model, calibration)
    model = ctx.providers.parent.model_to_prune(parent)
    if scores is None:
        result = pruner.prune(model, calibration, recipe.prune.ratio, recipe.calibration.batch_size)
    else:
        result = pruner.apply(model, scores.value, recipe.prune.ratio)
        if scores.shared:
            result.details["scores_shared_across_ratios"] = True
    # A sparse parent's zeros survive the prune (and so training): `hfprune.masks.parent`.
    carry_parent_masks(parent.masks, result, pruner.granularity, architecture_of(model.config).layers)
    result.seconds = time.perf_counter() - start
    return result


def prune_report(
    ctx: Context, result: PruneResult, parent_config: dict, before: ParamCount
) -> dict[str, Any]:
    """`prune_report.json`: what was removed, measured parameter counts, and what reproduces it."""
    recipe, pruner = ctx.recipe, ctx.pruner
    after = count_parameters(result.model)
    # Sparse: the shapes are the parent's, the removed weights are the masked ones (a sparse parent's
    # zeros included). A structural ratio counts the structure, even with a sparse parent's masks carried.
    if result.masks and pruner.granularity is Granularity.SPARSE:
        removed = sum(int((~keep).sum()) for keep in result.masks.values())
        after = ParamCount(total=after.total - removed, embedding=after.embedding)
    shape = result.shape.to_dict()
    # Measured counts are authoritative; the plan's are from the config formula.
    shape["params_before"], shape["params_after"] = before.to_dict(), after.to_dict()
    shape["ratio_achieved"] = round(1 - after.non_embedding / before.non_embedding, 6)
    return {
        "method": pruner.name,
        "granularity": str(pruner.granularity),
        "description": METHODS[pruner.name].description,
        "options": pruner.options.model_dump(mode="json"),
        "ratio_requested": recipe.prune.ratio,
        "ratio_achieved": shape["ratio_achieved"],
        "params_before": shape["params_before"],
        "params_after": shape["params_after"],
        **result.details,
        "shape": shape,
        "parent": recipe.parent.model_dump(mode="json"),
        "parent_config": {k: parent_config.get(k) for k in SHAPE_KEYS},
        "calibration": recipe.calibration.model_dump(mode="json") if pruner.needs_calibration else None,
        "seed": recipe.seed,
        "seconds": round(result.seconds, 3),
        "hfprune_version": __version__,
    }
