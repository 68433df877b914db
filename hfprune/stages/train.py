"""The `train_<kind>` stages: one trained kind (`hfprune.kinds`) trained on the recipe's token budget.

A kind made from the pruned weights starts from `models/pruned/` as saved; a kind made from a random-init
twin starts from a freshly initialised model of the same shape (and masks), unless the twin provider
has an identical finished twin to publish instead. Training itself is `hfprune.training`; this stage
runs on every process under torchrun (the Trainer is collective) and only the main process writes.

The kind's `recovery` (`hfprune.kinds.Recovery`) decides what is trained, on the same budget, tokens,
masks and resume as plain training:

- distill: the loss is `hfprune.recovery.distill.DistillationLoss` against the parent, taken from the
  parent provider (a sweep shares one), frozen, in the training dtype on the student's device. The
  Trainer counts tokens from the batch before the loss runs, so the teacher's forward never counts.
- lora: `wrap_lora` adds adapters restricted by the sparsity masks before training (and again on
  resume: checkpoints hold the adapters); after training `merge_lora` folds them in, and the merged plain
  model is saved (no adapter files), so every masked weight stays exactly zero.
"""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, set_seed

from hfprune import distributed, kinds
from hfprune.eval import evaluation_windows
from hfprune.outputs import distributed_staging_dir
from hfprune.seeds import Role, role_seed
from hfprune.training import (
    HeldOutCurveCallback,
    learning_curve,
    load_for_training,
    masks_for_training,
    save_trained,
    train_model,
    trained_model_for_eval,
    training_work_dir,
    twin_for_training,
)
from hfprune.workspace import MASKS_FILE


if TYPE_CHECKING:
    from hfprune.stages.base import Context


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
    model = starting_model(ctx, from_twin, masks)
    keep = {name: mask.unpack() for name, mask in masks.items()} if masks else None
    if recovery is kinds.Recovery.LORA:
        from hfprune.recovery.lora import wrap_lora

        # The adapters' initialisation is the recipe's (its own stream), not the process's history.
        set_seed(role_seed(ctx.recipe.seed, Role.ADAPTER_INIT))
        model = wrap_lora(model, spec.lora, masks=keep)
    work_dir = training_work_dir(ws.train_dir(kind), ctx.fingerprint(f"train_{kind}"))
    trainer, outcome = train_model(
        model,
        tokenizer,
        spec,
        run=kind,
        seed=role_seed(ctx.recipe.seed, Role.DATA_ORDER),
        work_dir=work_dir,
        masks=masks,
        callbacks=curve_callbacks(ctx, tokenizer),
        train_loss=distillation_loss(ctx) if recovery is kinds.Recovery.DISTILL else None,
    )
    merged = None
    if recovery is kinds.Recovery.LORA:
        from hfprune.recovery.lora import merge_lora

        merged = merge_lora(trainer.accelerator.unwrap_model(trainer.model), keep)
    with distributed_staging_dir(ws.model_dir(kind)) as staging:
        save_trained(trainer, tokenizer, outcome, staging, model=merged)
        if masks is not None and distributed.is_main_process():
            shutil.copyfile(ws.masks_path, staging / MASKS_FILE)
    if distributed.is_main_process():
        record_training(ctx, kind, trainer, outcome)
        # The trained model is published; its checkpoints (weights plus optimizer state, about four
        # times the model) only served resuming this stage, and a sweep would pile them up.
        shutil.rmtree(work_dir, ignore_errors=True)
    # Collective when the model is sharded: every process gathers, rank 0 keeps a whole copy to evaluate.
    evaluable = merged if merged is not None else trained_model_for_eval(trainer)
    if evaluable is not None:
        ctx.models[kind] = evaluable


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
    from hfprune.recovery.distill import DistillationLoss, training_dtype

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
    windows, bos = evaluation_windows(spec.dataset, tokenizer, spec.seq_len, spec.max_windows)
    return [HeldOutCurveCallback(windows, bos, every, ctx.recipe.eval.batch_size)]
