"""The Trainer of the train stage: a stock `transformers.Trainer` plus the few things callbacks cannot do.

The pipeline trains the pruned model ("continued") and its random-init twin ("scratch") with the same
`PruneTrainer` setup. Behaviour lives in `hfprune.callbacks`; this subclass only

- wires them from plain arguments (`token_budget=`, `masks=`);
- lets a model kind bring its own training loss (`train_loss=`, e.g.
  `hfprune.training.recovery.distill.DistillationLoss`) without a Trainer subclass per kind;
- zeroes masked gradients right after the last backward of each optimizer step, so the norm used for
  gradient clipping ignores pruned weights (a callback is only called after clipping);
- destroys the distributed process group when the process exits: without it, torchrun processes can
  abort at interpreter exit ("terminate called without an active exception"). It waits for exit rather
  than the end of `train()` so that saving or evaluating after training can still use the group.

Token accounting is the Trainer's own (`include_num_input_tokens_seen="non_padding"`), which is already
exact: counted per micro-batch, gathered over processes, saved and restored with checkpoints.
"""

import atexit
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer

from hfprune.callbacks.sparsity_mask import SparsityMaskCallback
from hfprune.callbacks.token_budget import TokenBudgetCallback
from hfprune.masks.packed import KeepMask


logger = logging.getLogger(__name__)

_exit_hook_registered = False

TrainLoss = Callable[[nn.Module, Mapping[str, Any], torch.Tensor | int | None], torch.Tensor]
"""`(model, inputs, num_items_in_batch) -> loss`: `model` is the wrapped model to run forward, `inputs` the
micro-batch with `labels`. The loss is normalised like transformers' own: summed over the valid (label
!= -100) positions and divided by `num_items_in_batch` when given, else averaged over the micro-batch."""


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_destroy_process_group)
        _exit_hook_registered = True


class PruneTrainer(Trainer):
    """`transformers.Trainer` with token budgets and sparse masks as arguments.

    Args:
        *args: Passed to `transformers.Trainer`.
        token_budget: If set, adds a `TokenBudgetCallback(token_budget)`.
        masks: If set, adds a `SparsityMaskCallback(masks)` (parameter name -> bool keep-mask, or a
            `hfprune.masks.packed.PackedMask` left bit-packed, possibly only this process's FSDP2 shard).
        train_loss: If set, replaces the model's loss on training micro-batches (see `TrainLoss`);
            evaluation keeps the model's own loss, so eval losses stay comparable across kinds.
        **kwargs: Passed to `transformers.Trainer`.

    Example:
        >>> trainer = PruneTrainer(model=model, args=args, train_dataset=stream,
        ...                        token_budget=50_000_000, masks=masks)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        *args: Any,
        token_budget: int | None = None,
        masks: Mapping[str, KeepMask] | None = None,
        train_loss: TrainLoss | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_loss = train_loss
        if token_budget is not None:
            self.add_callback(TokenBudgetCallback(token_budget))
        if masks is not None:
            self.add_callback(SparsityMaskCallback(masks))
        if dist.is_available() and dist.is_initialized():
            _register_exit_hook()

    @property
    def mask_callbacks(self) -> list[SparsityMaskCallback]:
        """The `SparsityMaskCallback`s in use, whether added through `masks=` or `callbacks=`."""
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, SparsityMaskCallback)]

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Stock training step; after the micro-batch that completes an optimizer step (gradients are
        synchronised across processes by then), masked gradient entries are zeroed before clipping."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            for callback in self.mask_callbacks:
                callback.zero_masked_grads(model)
                callback.grads_zeroed_at_step = self.state.global_step
        return loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's own loss, or `train_loss` on training micro-batches when one is set."""
        if self.train_loss is None or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.train_loss(model, inputs, num_items_in_batch)
        # Same correction as Trainer.compute_loss: a loss divided by the token count of all processes is
        # multiplied back by the process count, which DDP's gradient averaging divides out again.
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss
