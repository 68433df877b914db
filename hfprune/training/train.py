"""The train stage: one model (the pruned one, or its random-init twin) trained on a token budget.

Called by the pipeline once per run in `train.runs`. It builds the packed token stream (identical for
both runs), derives `TrainingArguments` from the budget (paper defaults, then the recipe's `train.args`,
then the budget schedule), checks the setup before any step, and trains with `PruneTrainer`, resuming
from the last complete checkpoint in its work folder. A checkpoint counts as complete only once the
Trainer has finished writing it (see `hfprune.training.checkpoints`), so a save cut short is never used; resuming a
checkpoint that already spent the budget ends at once, and a full disk at a checkpoint is one line.

Before and after `train_model`, the stage uses the host-side helpers of `hfprune.training.sharding`, re-exported
here: `load_for_training` / `twin_for_training` (weights read once per job under FSDP with
`cpu_ram_efficient_loading`), `masks_for_training` (bit-packed, this process's shard) and
`trained_model_for_eval` (a model one process can evaluate after FSDP training).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

from hfprune import distributed
from hfprune.callbacks.token_budget import PAPER_TRAINING_DEFAULTS
from hfprune.errors import RunFailure
from hfprune.eval.perplexity import perplexity
from hfprune.failures import writes_to
from hfprune.masks.packed import KeepMask
from hfprune.recipe.training import per_device_batch
from hfprune.trainer import PruneTrainer, TrainLoss
from hfprune.training import schedules
from hfprune.training.checkpoints import (
    CheckpointCompleteCallback,
    data_for_finished_run,
    last_complete_checkpoint,
    quiet_empty_epoch,
    spent_budget,
)
from hfprune.training.packing import PackedTokenStream, describe_order, training_stream


logger = logging.getLogger(__name__)


class TrainingSetupError(RunFailure, ValueError):
    """The training setup cannot spend the budget as asked; raised before the first step."""


@dataclass(frozen=True)
class TrainOutcome:
    run: str
    tokens_trained: int
    token_budget: int
    tokens_per_step: int
    steps: int
    resumed_from: str | None
    seconds: float
    data_order: str  # the document shuffle, in words (`hfprune.training.packing.describe_order`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DataExhaustedGuard(TrainerCallback):
    """A second pass over the data means it ran out before the budget: stop rather than repeat tokens.

    A run resumed from its final checkpoint also opens a second pass (the Trainer counts the finished
    pass as an epoch), with every step already done: that is the end of training, not a shortage.
    """

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.epoch and state.epoch >= 1 and state.global_step < state.max_steps:
            raise TrainingSetupError(
                f"the training dataset ran out after {state.num_input_tokens_seen} tokens, before the budget; "
                "lower train.token_budget or train.skip_tokens, or use a larger dataset"
            )


def training_arguments(
    spec: Any, seed: int, work_dir: Path, schedule: Mapping | None = None
) -> tuple[TrainingArguments, int]:
    """A run's TrainingArguments (`schedule` replacing its own: `hfprune.training.branches`) and tokens per step."""
    user = dict(spec.args)
    per_device = per_device_batch(user)
    accumulation = int(user.get("gradient_accumulation_steps", 1))
    tokens_per_step = schedules.tokens_per_step(spec)
    if spec.token_budget < tokens_per_step:
        raise TrainingSetupError(
            f"train.token_budget {spec.token_budget} is smaller than one global batch ({tokens_per_step} tokens = "
            f"{per_device} per device x {accumulation} accumulation x {distributed.world_size()} processes x "
            f"{spec.seq_len} seq_len)"
        )
    schedule = dict(schedule or schedules.schedule_args(spec, tokens_per_step))
    defaults = {
        **PAPER_TRAINING_DEFAULTS,
        "per_device_train_batch_size": per_device,
        "logging_steps": max(1, schedule["max_steps"] // 20),
        "save_strategy": "steps",
        "save_steps": max(1, schedule["max_steps"] // 4),
        "save_total_limit": 2,
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_drop_last": True,
        "ddp_find_unused_parameters": False,
    }
    values = {**defaults, **user, **schedule, "seed": seed, "data_seed": seed}
    values["include_num_input_tokens_seen"] = "non_padding"
    return TrainingArguments(output_dir=str(work_dir / "checkpoints"), **values), tokens_per_step


CURVE_KEY = "heldout_perplexity"


class HeldOutCurveCallback(TrainerCallback):
    """Held-out perplexity at token milestones (0, every, 2 x every, ..., and the end of training).

    Points go into `state.log_history`, which checkpoints save and resumes restore, so a resumed run
    keeps the points measured before the interruption. Every process evaluates (an FSDP forward is
    collective); the windows are small by design.
    """

    def __init__(self, windows: torch.Tensor, has_bos: bool, every_tokens: int, batch_size: int = 4):
        self.windows, self.has_bos = windows, has_bos
        self.every_tokens, self.batch_size = every_tokens, batch_size

    def _measured(self, state: Any) -> list[int]:
        return [entry["tokens"] for entry in state.log_history if CURVE_KEY in entry]

    def _measure(self, state: Any, model: Any) -> None:
        value = perplexity(model, self.windows, self.has_bos, {}, self.batch_size).value
        state.log_history.append(
            {CURVE_KEY: value, "tokens": int(state.num_input_tokens_seen), "step": state.global_step}
        )
        logger.info("held-out perplexity %.3f after %d tokens", value, state.num_input_tokens_seen)

    def on_train_begin(
        self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kwargs: Any
    ):
        if not self._measured(state):
            self._measure(state, model)

    def on_step_end(
        self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kwargs: Any
    ):
        last = max(self._measured(state), default=0)
        if state.num_input_tokens_seen >= (last // self.every_tokens + 1) * self.every_tokens:
            self._measure(state, model)

    def on_train_end(
        self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kwargs: Any
    ):
        if max(self._measured(state), default=-1) < state.num_input_tokens_seen:
            self._measure(state, model)


def learning_curve(trainer: PruneTrainer) -> list[dict[str, float]]:
    """The (tokens, perplexity) points a `HeldOutCurveCallback` recorded, in token order."""
    points = {e["tokens"]: e[CURVE_KEY] for e in trainer.state.log_history if CURVE_KEY in e}
    return [{"tokens": t, "perplexity": points[t]} for t in sorted(points)]


def training_work_dir(folder: Path, fingerprint: str) -> Path:
    """The folder holding a run's checkpoints; emptied when they belong to different training inputs."""
    stamp = folder / "inputs.txt"
    if distributed.is_main_process():
        if folder.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            logger.info("discarding checkpoints in %s: the training inputs changed", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
    distributed.barrier()
    return folder


def check_dataset_covers_budget(stream: PackedTokenStream, needed_tokens: int) -> None:
    """Fail before training when a finite (non-streaming) dataset holds fewer tokens than the run needs."""
    blocks_needed = -(-needed_tokens // stream.seq_len)
    available = 0
    for available, _ in enumerate(stream.blocks(), start=1):
        if available >= blocks_needed:
            return
    raise TrainingSetupError(
        f"the training dataset has {available * stream.seq_len} tokens after skip_tokens, but the budget needs "
        f"{needed_tokens} ({blocks_needed} blocks of {stream.seq_len}); lower train.token_budget or use more data"
    )


def check_positions(model: PreTrainedModel, seq_len: int) -> None:
    """`train.seq_len` must fit the model's positions (checked again here for library callers)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise TrainingSetupError(f"train.seq_len {seq_len} exceeds the model's limit of {limit} positions")


def train_model(
    model: PreTrainedModel,
    tokenizer: Any,
    spec: Any,
    *,
    run: str,
    seed: int,
    work_dir: Path,
    masks: Mapping[str, KeepMask] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    train_loss: TrainLoss | None = None,
    schedule: Mapping[str, Any] | None = None,
    resume_from: Path | None = None,
) -> tuple[PruneTrainer, TrainOutcome]:
    """Train `model` on `spec.token_budget` tokens, resuming from a checkpoint in `work_dir`; `train_loss` replaces
    the micro-batch loss (`DistillationLoss`); `schedule`, `resume_from`: see `hfprune.training.branches`."""
    check_positions(model, spec.seq_len)
    args, tokens_per_step = training_arguments(spec, seed, work_dir, schedule)
    stream = training_stream(spec, tokenizer, seed)
    resume = last_complete_checkpoint(work_dir / "checkpoints") or resume_from
    finished = resume is not None and spent_budget(resume, args.max_steps, spec.token_budget)
    if not finished and not spec.dataset.streaming:
        check_dataset_covers_budget(stream, args.max_steps * tokens_per_step)
    trainer = PruneTrainer(
        model=model,
        args=args,
        # Every step is done: the Trainer restores the final checkpoint and, given no data, ends at once.
        train_dataset=data_for_finished_run(args) if finished else stream,
        token_budget=spec.token_budget,
        masks=masks,
        callbacks=[CheckpointCompleteCallback(), DataExhaustedGuard(), *(callbacks or [])],
        train_loss=train_loss,
    )
    start = time.perf_counter()
    if resume:
        logger.info("%s: resuming from %s%s", run, resume, " (training had finished)" if finished else "")
    with writes_to(work_dir / "checkpoints"), quiet_empty_epoch(finished):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    outcome = TrainOutcome(
        run=run,
        tokens_trained=int(trainer.state.num_input_tokens_seen),
        token_budget=spec.token_budget,
        tokens_per_step=tokens_per_step,
        steps=trainer.state.global_step,
        resumed_from=resume.name if resume else None,
        seconds=round(time.perf_counter() - start, 3),
        data_order=describe_order(stream.shuffle_buffer),
    )
    logger.info("%s: trained on %d tokens in %d steps", run, outcome.tokens_trained, outcome.steps)
    return trainer, outcome


def save_trained(
    trainer: PruneTrainer,
    tokenizer: Any,
    outcome: TrainOutcome,
    folder: Path,
    model: PreTrainedModel | None = None,
) -> None:
    """Write the trained model (gathered from every process), tokenizer and training report into `folder`.

    Every process must call this (FSDP and DeepSpeed gather shards collectively); only the main process
    writes files. `model`, when given, is saved instead of the Trainer's (a LoRA model merged into a
    plain one: a plain checkpoint, no adapter files).
    """
    if model is None:
        trainer.save_model(str(folder))
    elif trainer.args.should_save:
        model.save_pretrained(folder)
    if trainer.args.should_save:
        tokenizer.save_pretrained(folder)
        (folder / "training_report.json").write_text(json.dumps(outcome.to_dict(), indent=2) + "\n")
        (folder / "training_args.bin").unlink(missing_ok=True)
