"""Recipe sections that train a model on a token budget: `train` (continued training and twins, in
`hfprune.recipe.schema`) and `parent.pretrain` (a parent hfprune pretrains itself) share `TokenTraining`.

Both go through the same `hfprune.training.train.train_model`: the same packed token stream, `PruneTrainer`,
token accounting, checkpoints and resume. `ScheduleSpec` chooses the learning-rate schedule:

- `cosine` (the default): warmup, then a cosine to `min_lr_ratio` reached exactly when the budget is
  spent; every budget trains from the start.
- `wsd` (warmup-stable-decay): warmup, a constant rate, then a decay over the last `decay_ratio` of the
  budget. The stable phase does not depend on the budget, so budgets of one model share one stable run
  and each budget is a short decay branch from the stable run's checkpoint (`hfprune.training.branches`).

`PretrainSpec` adds what a parent made from nothing needs: the architecture (Llama config fields) and a
tokenizer (an existing one, or a byte-level BPE trained on the pretraining text).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from hfprune.recipe.base import DatasetSpec, Strict, default_dataset


# `TrainingArguments.per_device_train_batch_size`'s default, for what is planned and counted before
# transformers is imported (a test holds it to the installed default).
TRAINER_DEFAULT_BATCH = 8


def per_device_batch(args: dict) -> int:
    """The per-device batch a section's `args` train with: theirs, else the Trainer's default."""
    return int(args.get("per_device_train_batch_size", TRAINER_DEFAULT_BATCH))


# TrainingArguments that hfprune derives itself; a recipe setting them would silently be overridden.
DERIVED_TRAINING_ARGS = {
    "output_dir": "set by hfprune under <output_dir>/.hfprune/train",
    "max_steps": "derived from train.token_budget",
    "num_train_epochs": "derived from train.token_budget",
    "lr_scheduler_type": "derived from train.schedule and train.token_budget",
    "lr_scheduler_kwargs": "use train.min_lr_ratio and train.schedule",
    "warmup_steps": "use train.warmup_ratio (or train.schedule.warmup_tokens)",
    "warmup_ratio": "use train.warmup_ratio",
    "include_num_input_tokens_seen": "always 'non_padding' (exact token accounting)",
    "seed": "use the recipe's seed",
    "data_seed": "use the recipe's seed",
}


def unknown_fields(keys: list[str], known: set[str], owner: str) -> list[str]:
    """A problem per key that is not a field of `owner`, with the closest field name as a hint."""
    problems = []
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key!r} is not a {owner} field{hint}")
    return problems


class ScheduleSpec(Strict):
    """The learning-rate schedule over a budget (see the module docstring)."""

    type: Literal["cosine", "wsd"] = "cosine"
    decay_ratio: float = Field(
        default=0.2, gt=0, le=1, description="wsd: fraction of each budget's steps spent decaying"
    )
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = Field(
        default="1-sqrt", description="wsd: the decay's shape (1-sqrt: Hägele et al. 2024)"
    )
    warmup_tokens: int | None = Field(
        default=None,
        gt=0,
        description="wsd: warmup length in tokens, shared by every branch (default: warmup_ratio of the "
        "smallest budget that shares the stable run)",
    )


class TokenTraining(Strict):
    """Training on a token budget: the fields `train` and `parent.pretrain` share."""

    token_budget: int = Field(gt=0, description="tokens the model trains on (summed over processes)")
    dataset: DatasetSpec = Field(default_factory=lambda: default_dataset("train"))
    seq_len: int = Field(default=512, gt=1)
    skip_tokens: int = Field(default=0, ge=0, description="start the stream after this many tokens")
    shuffle_buffer: int | None = Field(
        default=None,
        gt=0,
        description="documents in a shuffle buffer (1: the source order); unset, a dataset that is not "
        "streamed is permuted as a whole per seed and a streamed one gets a 1000-document buffer",
    )
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    args: dict[str, Any] = Field(default_factory=dict, description="passed to transformers.TrainingArguments")

    @field_validator("args")
    @classmethod
    def _known_training_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments)}
        problems = [
            f"{key!r} cannot be set here ({DERIVED_TRAINING_ARGS[key]})"
            for key in args
            if key in DERIVED_TRAINING_ARGS
        ]
        problems += unknown_fields(
            [key for key in args if key not in DERIVED_TRAINING_ARGS], known, "TrainingArguments"
        )
        if problems:
            raise ValueError("; ".join(problems))
        return args


class TokenizerSpec(Strict):
    """The tokenizer of a pretrained-here parent: an existing one (`from`), or a byte-level BPE of
    `vocab_size` trained with the `tokenizers` library on the first `train_chars` characters of the
    pretraining dataset in a fixed permutation (the same documents whatever the seed, a fair sample of
    the corpus: `hfprune.training.tokenizer`)."""

    # Written back as `from`, so the resolved recipe.yaml loads again.
    model_config = ConfigDict(**Strict.model_config, serialize_by_alias=True)

    from_: str | None = Field(default=None, alias="from", description="Hub repo id or local directory")
    vocab_size: int | None = Field(default=None, ge=260, le=1 << 20)
    train_chars: int = Field(default=20_000_000, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSpec:
        if (self.from_ is None) == (self.vocab_size is None):
            raise ValueError("give either `from` (an existing tokenizer) or `vocab_size` (train a BPE)")
        return self


class PretrainSpec(TokenTraining):
    """`parent.pretrain`: make the parent by pretraining a fresh Llama on `token_budget` tokens.

    `config` holds `transformers.LlamaConfig` fields (hidden_size, num_hidden_layers, ...); the vocabulary
    size and special token ids come from the tokenizer. The parent is written to `parent.model` (a local
    folder), with a card, and its pretraining tokens are the pipeline's first budget (setting 2).
    """

    config: dict[str, Any] = Field(description="transformers.LlamaConfig fields of the parent")
    tokenizer: TokenizerSpec

    @field_validator("config")
    @classmethod
    def _llama_fields(cls, config: dict[str, Any]) -> dict[str, Any]:
        from transformers import LlamaConfig

        known = set(LlamaConfig().to_dict())
        owned = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}
        problems = [f"{key!r} comes from the tokenizer" for key in config if key in owned]
        problems += unknown_fields([key for key in config if key not in owned], known, "LlamaConfig")
        if problems:
            raise ValueError("; ".join(problems))
        return config
