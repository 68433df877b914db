"""Resuming the train stage from its checkpoints (see `hfprune.training.train.train_model`).

A checkpoint counts as complete only once the Trainer has written all of it (a marker written in
`on_save`), so a save cut short is never resumed from. A complete checkpoint that already spent the
budget means the run was stopped between its final save and the publication of the trained model:
resuming it must end at once with that checkpoint's weights and token count, not train again, and not
take the restart of the data for a shortage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset
from transformers import TrainerCallback, TrainingArguments

from hfprune import distributed
from hfprune._faults import kill_point


logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".hfprune-complete"
# What the Trainer logs when an epoch has no batch: expected when resuming a finished run.
_NO_SAMPLE_WARNING = "There seems not to be a single sample in your epoch_iterator"


class CheckpointCompleteCallback(TrainerCallback):
    """Marks a checkpoint folder complete once the Trainer has written all of it."""

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            kill_point("checkpoint_save")  # written, not yet marked complete
            (folder / COMPLETE_MARKER).write_text(str(state.num_input_tokens_seen))
            kill_point("checkpoint_complete")  # a resumable checkpoint exists


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint with its completion marker; incomplete ones are deleted (rank 0)."""
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    if distributed.is_main_process():
        for partial in set(found) - set(complete):
            logger.warning("removing incomplete checkpoint %s (its save was interrupted)", partial)
            shutil.rmtree(partial, ignore_errors=True)
    return complete[-1] if complete else None


def spent_budget(checkpoint: Path, max_steps: int, token_budget: int) -> bool:
    """Whether `checkpoint` ended training: its step is the last one, or its tokens reach the budget."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= max_steps or state.get("num_input_tokens_seen", 0) >= token_budget


class _NoData(IterableDataset):
    """The training data of a run resumed from its final checkpoint: nothing is left to train on."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(())


def data_for_finished_run(args: TrainingArguments) -> IterableDataset:
    """Training data that makes `Trainer.train(resume_from_checkpoint=final)` restore and end at once.

    The Trainer restores the weights, the state (tokens, log history) and the callbacks' state as for
    any resume, finds no batch, and ends: `on_train_end` runs as in an uninterrupted run. Given the
    real data it would train one more step instead. Batches are not dispatched from the main process
    either: there is none to dispatch, and accelerate's dispatcher fails without a first batch.
    """
    args.accelerator_config.dispatch_batches = False
    return _NoData()


@contextlib.contextmanager
def quiet_empty_epoch(active: bool) -> Iterator[None]:
    """While `active`, drop the Trainer's warning about an epoch without batches (expected, alarming)."""

    def keep(record: logging.LogRecord) -> bool:
        return _NO_SAMPLE_WARNING not in record.getMessage()

    trainer_logger = logging.getLogger("transformers.trainer")
    if active:
        trainer_logger.addFilter(keep)
    try:
        yield
    finally:
        trainer_logger.removeFilter(keep)
