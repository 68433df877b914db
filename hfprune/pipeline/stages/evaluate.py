"""The `<kind>_eval` stages: held-out perplexity (and lm-eval tasks) of one model, into metrics.json.

Runs after the stage that made the model (the parent is loaded by its provider). The model comes from
memory when this process just made it, else from its folder, and is evaluated where the parent computes
(`parent.device`: the accelerator when there is one, `hfprune.models.placement`); the stage logs the device and
dtype. Under torchrun it runs on the main process only (`Stage.all_ranks` is False). A made model is
dropped from memory once evaluated, so the accelerator is free for the next stage. A sweep cell whose
sibling already evaluated the same model the same way copies those scores instead (`Providers.donors`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hfprune import kinds
from hfprune.eval.lmeval import evaluate_lm
from hfprune.eval.perplexity import perplexity_scores
from hfprune.models.placement import log_stage, place, resolve_device
from hfprune.models.structure import count_parameters


if TYPE_CHECKING:
    from hfprune.pipeline.stages.base import Context


logger = logging.getLogger(__name__)


def run(ctx: Context, kind: str) -> None:
    if ctx.providers.donors.copy_scores(ctx, f"{kind}_eval", kind):
        return
    if kinds.get(kind).making is kinds.Making.LOADED:
        parent = ctx.providers.parent.get(ctx.recipe)  # placed when it was loaded
        model, tokenizer = parent.model, parent.tokenizer
    else:
        folder = ctx.workspace.model_dir(kind)
        model = ctx.models.pop(kind, None) or AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        model.eval()
        place(model, resolve_device(ctx.recipe.parent.device), stage=f"{kind}_eval")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    log_stage(f"{kind}_eval", model)
    record_scores(ctx, kind, model, tokenizer)
    if kinds.get(kind).making is kinds.Making.LOADED:
        from hfprune.pipeline.stages.pretrain import record_declared_tokens

        record_declared_tokens(ctx)


def record_scores(ctx: Context, kind: str, model: PreTrainedModel, tokenizer: Any) -> None:
    """Parameters, each perplexity set and the lm-eval tasks of `model`, merged into `kind`'s entry
    (which keeps what training recorded there)."""
    spec = ctx.recipe.eval
    logger.info("scoring %s", kind)
    scores = perplexity_scores(model, tokenizer, spec)
    params = count_parameters(model).to_dict()
    lm_eval = evaluate_lm(model, tokenizer, spec)
    if lm_eval is None:  # a recipe without lm-eval tasks records none (and drops an earlier run's)
        ctx.workspace.metrics.update(kind, drop=["lm_eval"], params=params, perplexity=scores)
    else:
        ctx.workspace.metrics.update(kind, params=params, perplexity=scores, lm_eval=lm_eval)
