"""The `train_<kind>` stages: one trained kind (`hfprune.kinds`) trained on the recipe's token budget.

A kind made from the pruned weights starts from `models/pruned/` as saved; a kind made from a random-init
twin starts from a freshly initialised model of the same shape (and masks), unless the twin provider
has an identical finished twin to publish instead. Training itself is `hfprune.training.train`; this stage
runs on every process under torchrun (the Trainer is collective) and only the main process writes.

The kind's `recovery` (`hfprune.kinds.Recovery`) decides what is trained, on the same budget, tokens,
masks and resume as plain training:

- distill: the loss is `hfprune.training.recovery.distill.DistillationLoss` against the parent, taken from the
  parent provider (a sweep shares one), frozen, in the training dtype on the student's device. The
  Trainer counts tokens from the batch before the loss runs, so the teacher's forward never counts.
- lora: `wrap_lora` adds adapters restricted by the sparsity masks before training (and again on
  resume: checkpoints hold the adapters); after training `merge_lora` folds them in, and the merged plain
  model is saved (no adapter files), so every masked weight stays exactly zero.

With `train.schedule.type: wsd` the kind trains as a decay branch of its model's stable run
(`hfprune.training.branches`), with the same inputs; metrics.json records the branch (`branch`).
"""

from __future__ import annotations

import copy
import functools
import shutil
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, set_seed

from hfprune import distributed, kinds
from hfprune.eval.perplexity import evaluation_windows
from hfprune.outputs import distributed_staging_dir
from hfprune.pipeline.workspace import MASKS_FILE
from hfprune.seeds import Role, role_seed
from hfprune.training.branches import train_branch
from hfprune.training.sharding import (
    load_for_training,
    masks_for_training,
    trained_model_for_eval,
    twin_for_training,
)
from hfprune.training.train import (
    HeldOutCurveCallback,
    learning_curve,
    save_trained,
    train_model,
    training_work_dir,
)


if TYPE_CHECKING:
    from hfprune.pipeline.stages.base import Context


def run(ctx: Context, kind: str) -> None:
    spec, ws = ctx.recipe.train_spec(kind), ctx.workspace
    recovery = kinds.get(kind).recovery
    from_twin = kinds.get(kind).making is kinds.Making.FROM_TWIN
    if from_twin and ctx.providers.twins.take(ctx, kind):
        return
    tokenizer = AutoTokenizer.from_pretrained(ws.pruned_dir)
    # Bit-packed masks (this rank's shard under FSDP); fp32 master weights whatever the checkpoint
    # dtype, read once per job under FSDP's RAM-efficient loading; the twin never beside a loaded copy.
    masks = masks_for_training(ws.masks_path, spec.args, twin=from_twin)
    keep = {name: mask.unpack() for name, mask in masks.items()} if masks else None
    make_model = functools.partial(prepared_model, ctx, kind, masks, keep)
    branch = None
    inputs = training_inputs(ctx, kind, tokenizer, masks)
    if spec.schedule.type == "wsd":  # a decay branch of the model's stable run (hfprune.training.branches)
        work_dir = ws.train_dir(kind)
        trainer, outcome, branch = train_branch(ctx, kind, spec, tokenizer, make_model, **inputs)
    else:
        work_dir = training_work_dir(ws.train_dir(kind), ctx.fingerprint(f"train_{kind}"))
        trainer, outcome = train_model(make_model(), tokenizer, spec, work_dir=work_dir, **inputs)
    merged = None
    if recovery is kinds.Recovery.LORA:
        from hfprune.training.recovery.lora import merge_lora

        merged = merge_lora(trainer.accelerator.unwrap_model(trainer.model), keep)
    with distributed_staging_dir(ws.model_dir(kind)) as staging:
        save_trained(trainer, tokenizer, outcome, staging, model=merged)
        if masks is not None and distributed.is_main_process():
            shutil.copyfile(ws.masks_path, staging / MASKS_FILE)
    if distributed.is_main_process():
        record_training(ctx, kind, trainer, outcome)
        if branch is not None:
            ws.metrics.update(kind, branch=branch)
        # The trained model is published; its checkpoints (weights plus optimizer state, about four
        # times the model) only served resuming this stage, and a sweep would pile them up.
        shutil.rmtree(work_dir, ignore_errors=True)
    # Collective when the model is sharded: every process gathers, rank 0 keeps a whole copy to evaluate.
    evaluable = merged if merged is not None else trained_model_for_eval(trainer)
    if evaluable is not None:
        ctx.models[kind] = evaluable


def training_inputs(ctx: Context, kind: str, tokenizer: Any, masks: Any) -> dict[str, Any]:
    """`train_model`'s keywords that do not depend on the schedule: the run, its data order, its masks,
    its learning curve and (for a distilling kind) its loss."""
    recovery = kinds.get(kind).recovery
    return {
        "run": kind,
        "seed": role_seed(ctx.recipe.seed, Role.DATA_ORDER),
        "masks": masks,
        "callbacks": curve_callbacks(ctx, tokenizer),
        "train_loss": distillation_loss(ctx) if recovery is kinds.Recovery.DISTILL else None,
    }


def prepared_model(ctx: Context, kind: str, masks: Any, keep: dict[str, Any] | None) -> Any:
    """The model `kind` starts training from, with LoRA adapters (restricted by the masks) if it trains
    them; built anew for each phase of a wsd kind (its stable run, then its branch)."""
    model = starting_model(ctx, kinds.get(kind).making is kinds.Making.FROM_TWIN, masks)
    if kinds.get(kind).recovery is kinds.Recovery.LORA:
        from hfprune.training.recovery.lora import wrap_lora

        # The adapters' initialisation is the recipe's (its own stream), not the process's history.
        set_seed(role_seed(ctx.recipe.seed, Role.ADAPTER_INIT))
        model = wrap_lora(model, ctx.recipe.train_spec(kind).lora, masks=keep)
    return model


def starting_model(ctx: Context, from_twin: bool, masks: Any) -> Any:
    """The pruned model as saved, or its random-init twin of the same shape (and masks)."""
    spec, folder = ctx.recipe.train, ctx.workspace.pruned_dir
    if not from_twin:
        return load_for_training(folder, spec.args)
    reinit = spec.reinit_embeddings_and_norms
    # The twin's own seed stream: never the initialisation of a parent pretrained from the recipe seed.
    seed = role_seed(ctx.recipe.seed, Role.TWIN_INIT)
    return twin_for_training(folder, spec.args, seed=seed, masks=masks, reinit_embeddings_and_norms=reinit)


def record_training(ctx: Context, kind: str, trainer: Any, outcome: Any) -> None:
    """The kind's training in metrics.json (its recovery settings and study setting too), replacing
    earlier scores."""
    spec = ctx.recipe.train
    trained: dict[str, Any] = {
        "tokens_trained": outcome.tokens_trained,
        "training": outcome.to_dict(),
        "setting": kinds.get(kind).setting,
    }
    recovery = kinds.get(kind).recovery
    if recovery is not None:
        settings = getattr(spec, str(recovery))
        trained["recovery"] = {"kind": str(recovery), **settings.model_dump(mode="json")}
    if ctx.recipe.eval.every_tokens:
        trained["curve"] = learning_curve(trainer)
    ctx.workspace.metrics.update(kind, replace=True, **trained)  # earlier scores belong to an earlier model


def distillation_loss(ctx: Context) -> Any:
    """The loss of a distilling kind: the parent (from the provider, so a sweep loads it once) as the
    teacher, run frozen in the training dtype (bf16/fp16 when `train.args` asks for it)."""
    from hfprune.training.recovery.distill import DistillationLoss, training_dtype

    spec = ctx.recipe.train
    args = SimpleNamespace(bf16=bool(spec.args.get("bf16")), fp16=bool(spec.args.get("fp16")))
    dtype = training_dtype(args)
    teacher = ctx.providers.parent.get(ctx.recipe).model
    if dtype is not None and teacher.dtype != dtype:
        # DistillationLoss casts its teacher in place; a shared parent must keep its precision for the
        # pruning of later runs, so the teacher is a copy when its dtype would change.
        teacher = copy.deepcopy(teacher)
    return DistillationLoss(teacher, spec.distill, dtype=dtype)


def curve_callbacks(ctx: Context, tokenizer: Any) -> list[HeldOutCurveCallback]:
    """Learning curves on the first perplexity set, when `eval.every_tokens` asks for them."""
    every, sets = ctx.recipe.eval.every_tokens, ctx.recipe.eval.perplexity
    if not every or not sets:
        return []
    spec = sets[0]
    windows, bos, _ = evaluation_windows(spec.dataset, tokenizer, spec.seq_len, spec.max_windows)
    return [HeldOutCurveCallback(windows, bos, every, ctx.recipe.eval.batch_size)]
