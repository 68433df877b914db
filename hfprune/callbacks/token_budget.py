"""Token budgets for the train stage: stop training when a token budget is spent, and derive the
learning-rate schedule that ends exactly there.

The study compares models trained on the same number of tokens (the pruned model's continued training
and its random-init twin), so budgets are counted in tokens, not steps. The pipeline's train stage
builds `TrainingArguments` from `PAPER_TRAINING_DEFAULTS` and `budget_schedule`, and adds a
`TokenBudgetCallback`; any other training script can do the same with a plain `transformers.Trainer`.

Counting relies on the Trainer's own `include_num_input_tokens_seen="non_padding"` accounting, which in
transformers 5.24 is exact for this purpose: it adds `attention_mask.sum()` (or the non-pad count of
`input_ids` when there is no mask) after every micro-batch, gathers it over all processes, keeps the
running total in `TrainerState.num_input_tokens_seen`, and saves and restores it with every checkpoint.
"""

import inspect
import logging
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import SaveStrategy


logger = logging.getLogger(__name__)

# Picks the variant whose last optimizer step runs at exactly `min_lr_rate * peak` and whose first
# step already runs at `peak / warmup_steps`. The older "cosine_with_min_lr" reaches the floor only one
# step after training ends and spends its first update at a learning rate of 0.
SCHEDULER: Final[str] = "cosine_warmup_with_min_lr"

PAPER_TRAINING_DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "optim": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.1,
        "learning_rate": 3e-4,
        "max_grad_norm": 1.0,
        "lr_scheduler_type": SCHEDULER,
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        # A float below 1 is a fraction of max_steps for TrainingArguments (rounded up).
        "warmup_steps": 0.05,
    }
)
"""Optimizer and schedule of arXiv 2606.14150 (AdamW 0.9/0.95, eps 1e-8, weight decay 0.1, peak LR 3e-4,
5% linear warmup, cosine to 10% of peak, gradient clip 1.0) as `TrainingArguments` keywords. The paper
also trains in bf16 with fp32 master weights (`bf16=True`), which depends on the hardware and is left out.
Read-only: copy it (`dict(PAPER_TRAINING_DEFAULTS)`) to change a value."""


def budget_schedule(
    token_budget: int, tokens_per_step: int, warmup_ratio: float = 0.05, min_lr_ratio: float = 0.1
) -> dict[str, Any]:
    """`TrainingArguments` overrides that spend `token_budget` in whole optimizer steps.

    The learning rate warms up linearly over `ceil(warmup_ratio * max_steps)` steps, then follows a cosine
    down to `min_lr_ratio * learning_rate`, which is the rate of the last optimizer step, the one that
    spends the budget.

    Args:
        token_budget: Tokens to train on, summed over all processes.
        tokens_per_step: Tokens in one optimizer step: per-device batch x gradient accumulation x
            processes x sequence length, for packed data without padding.
        warmup_ratio: Fraction of the steps spent in linear warmup, in [0, 1).
        min_lr_ratio: Final learning rate as a fraction of the peak, in [0, 1].

    Returns:
        `max_steps`, `warmup_steps`, `lr_scheduler_type` and `lr_scheduler_kwargs`.

    Example:
        >>> budget_schedule(10_000, 4096)["max_steps"]
        3
    """
    if token_budget <= 0 or tokens_per_step <= 0:
        raise ValueError(
            f"token_budget and tokens_per_step must be positive, got {token_budget} and {tokens_per_step}"
        )
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    max_steps = math.ceil(token_budget / tokens_per_step)
    return {
        "max_steps": max_steps,
        "warmup_steps": math.ceil(warmup_ratio * max_steps),
        "lr_scheduler_type": SCHEDULER,
        "lr_scheduler_kwargs": {"min_lr_rate": min_lr_ratio},
    }


class _CountAllTokensNote(logging.Filter):
    """Turns the Trainer's per-micro-batch "could not determine" warning into one note of ours.

    With `"non_padding"` counting, batches without an `attention_mask` and a Trainer without a tokenizer
    that has a pad token leave the Trainer nothing to tell padding by: it counts every token, which is
    right for packed data, and says so on every micro-batch. The filter sits on the Trainer's logger and
    acts only for a Trainer that has a `TokenBudgetCallback` (found on the call stack), so it holds no
    state between runs and other Trainers keep the stock warning.
    """

    MESSAGE = "Could not determine method to count non-padding tokens"

    def filter(self, record: logging.LogRecord) -> bool:
        if self.MESSAGE not in record.getMessage():
            return True
        budget = _budget_of_counting_trainer()
        if budget is None:
            return True
        budget.note_counting_all_tokens()
        return False


def _budget_of_counting_trainer() -> "TokenBudgetCallback | None":
    """The `TokenBudgetCallback` of the Trainer whose token counting is logging now, if it has one."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_name != "_track_num_input_tokens":
        frame = frame.f_back
    trainer = frame.f_locals.get("self") if frame is not None else None
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
    return next((cb for cb in callbacks if isinstance(cb, TokenBudgetCallback)), None)


_COUNT_NOTE = _CountAllTokensNote()


class TokenBudgetCallback(TrainerCallback):
    """Stops training at the first optimizer step whose global token count reaches the budget.

    Tokens are the non-padding input tokens of every micro-batch of every process, so the run overshoots
    the budget by less than one global batch. The count comes from the Trainer's
    `state.num_input_tokens_seen`; the callback switches `include_num_input_tokens_seen` to
    `"non_padding"` when it is off. Because that count lives in the trainer state, a run resumed from a
    checkpoint continues from the saved count: no token is lost or counted twice. Every log entry also
    gets a `tokens_trained` field. Counting costs one small all-gather per micro-batch.

    When training ends short of the budget (`max_steps` too small, or the data ran out), the callback
    says so at the end, with the tokens seen and the reason. Batches without an `attention_mask` are
    counted whole (nothing marks their padding), with one note instead of the Trainer's warning on
    every micro-batch.

    Args:
        token_budget: Tokens to train on, summed over all processes.

    Example:
        >>> from transformers import Trainer, TrainingArguments
        >>> from hfprune.callbacks import TokenBudgetCallback, budget_schedule
        >>> args = TrainingArguments("out", **budget_schedule(50_000_000, tokens_per_step=512 * 2048))
        >>> trainer = Trainer(model=model, args=args, train_dataset=train_data,
        ...                   callbacks=[TokenBudgetCallback(50_000_000)])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, token_budget: int) -> None:
        if token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {token_budget}")
        self.token_budget = int(token_budget)
        self._tokens_at_step_begin: int | None = None
        self._warned_no_progress = False
        self._noted_all_tokens = False
        logging.getLogger("transformers.trainer").addFilter(_COUNT_NOTE)  # once: addFilter deduplicates

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._enable_token_counting(args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Again here: a callback added with `trainer.add_callback` never sees `on_init_end`.
        self._enable_token_counting(args)
        if state.num_input_tokens_seen < self.token_budget:
            return
        if state.global_step >= state.max_steps:
            logger.info(
                "Resumed at the end of training: the budget of %d tokens was spent (%d tokens, step %d)",
                self.token_budget,
                state.num_input_tokens_seen,
                state.global_step,
            )
        else:
            logger.warning(
                "Token budget %d already spent at start (%d tokens trained); the Trainer still runs at most "
                "one step before the callback can stop it",
                self.token_budget,
                state.num_input_tokens_seen,
            )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        tokens = int(state.num_input_tokens_seen)
        if tokens >= self.token_budget:
            return
        if args.max_steps > 0 and state.global_step >= args.max_steps:
            why = (
                f"max_steps={args.max_steps} ended training first (budget_schedule(token_budget, "
                "tokens_per_step) gives the steps that spend the budget)"
            )
        elif args.max_steps <= 0 and state.global_step >= state.max_steps:
            why = (
                f"the training data ran out: num_train_epochs={args.num_train_epochs:g} passes over it ended"
            )
        else:
            why = (
                f"the training data ran out at step {state.global_step}, before max_steps={state.max_steps} "
                "(or another callback stopped training)"
            )
        logger.warning(
            "Token budget %d not reached: training ended after %d tokens (%.1f%%) at step %d, because %s",
            self.token_budget,
            tokens,
            100 * tokens / self.token_budget,
            state.global_step,
            why,
        )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._tokens_at_step_begin = state.num_input_tokens_seen

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        tokens = state.num_input_tokens_seen
        if tokens == self._tokens_at_step_begin and not self._warned_no_progress:
            self._warned_no_progress = True
            logger.warning(
                "Step %d trained on 0 counted tokens; check that the batches carry `input_ids` "
                "(or the model's main input) and an `attention_mask`",
                state.global_step,
            )
        if tokens >= self.token_budget:
            logger.info(
                "Token budget %d reached at step %d with %d tokens",
                self.token_budget,
                state.global_step,
                tokens,
            )
            control.should_training_stop = True
            control.should_log = True
            # Mirror what the Trainer does at max_steps, so the stopping point is a checkpoint too.
            if args.save_strategy == SaveStrategy.STEPS:
                control.should_save = True
        return control

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        if logs is None:
            return
        tokens = int(state.num_input_tokens_seen)
        logs["tokens_trained"] = tokens
        # The Trainer appends a copy of `logs` to the history before calling back, so update that copy too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["tokens_trained"] = tokens

    def note_counting_all_tokens(self) -> None:
        """Say once that batches without a mask are counted whole (see `_CountAllTokensNote`)."""
        if not self._noted_all_tokens:
            self._noted_all_tokens = True
            logger.info(
                "Batches carry no attention_mask and the Trainer has no tokenizer with a pad token: every "
                "input token counts toward the budget (pass an attention_mask to leave padding out)"
            )

    @staticmethod
    def _enable_token_counting(args: TrainingArguments) -> None:
        mode = args.include_num_input_tokens_seen
        if mode in ("no", False, None):
            logger.info("TokenBudgetCallback: setting include_num_input_tokens_seen='non_padding'")
            args.include_num_input_tokens_seen = "non_padding"
        elif mode in ("all", True):
            logger.warning(
                "include_num_input_tokens_seen='all' counts padding tokens against the token budget; "
                "use 'non_padding' to count only real tokens"
            )
