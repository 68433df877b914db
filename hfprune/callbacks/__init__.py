"""Trainer callbacks of the train stage, usable in any `transformers.Trainer` script.

`TokenBudgetCallback` stops a run when a token budget is spent, `budget_schedule` turns that budget into
`TrainingArguments` overrides, and `SparsityMaskCallback` keeps pruned weights at zero.
"""

from hfprune.callbacks.sparsity_mask import SparsityMaskCallback
from hfprune.callbacks.token_budget import PAPER_TRAINING_DEFAULTS, TokenBudgetCallback, budget_schedule


__all__ = [
    "PAPER_TRAINING_DEFAULTS",
    "SparsityMaskCallback",
    "TokenBudgetCallback",
    "budget_schedule",
]
