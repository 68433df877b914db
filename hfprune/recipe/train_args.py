"""`train.args` checked at validation: the run's `TrainingArguments` are built before any work.

Part of recipe validation (`hfprune.recipe.schema.validate_recipe`) and of the pre-flight check
(`hfprune.checks.preflight`). The arguments come from the train stage's own builder,
`hfprune.training.train.training_arguments`, so validation accepts exactly what training will; they are
built in a temporary folder (nothing is written under the output folder) with transformers' warnings
held back (the run prints them once, when it trains). Whatever the builder or `TrainingArguments`
rejects becomes a problem keyed `train.args.<field>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
import types
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


# Counts that must be positive: the builder multiplies the first two into the tokens of one step,
# and a zero save interval passes TrainingArguments but divides by zero at the first step.
POSITIVE_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps")

_KINDS = {int: "an integer", float: "a number", bool: "true or false"}


def training_args_problems(train: Any, seed: int) -> list[tuple[str, str]]:
    """Problems with `train.args` (`train` a valid `TrainSpec`), found by building the TrainingArguments.

    The budget is not judged here (`hfprune.checks.preflight` does, with the number of processes): the
    arguments are built for a budget of at least one optimizer step.
    """
    problems = _value_problems(train.args)
    if problems:
        return problems
    from hfprune.training.train import TrainingSetupError

    try:
        build_training_arguments(train, seed)
    except TrainingSetupError:
        try:
            build_training_arguments(train.model_copy(update={"token_budget": 1 << 62}), seed)
        except Exception as err:  # noqa: BLE001 - anything TrainingArguments raises is about these values
            return [(_key(err, train.args), _reason(err))]
    except Exception as err:  # noqa: BLE001 - as above
        return [(_key(err, train.args), _reason(err))]
    return []


def build_training_arguments(train: Any, seed: int) -> int:
    """Build the run's TrainingArguments in a temporary folder; the tokens in one optimizer step.

    Raises what the builder raises: `TrainingSetupError` when the budget is smaller than one step.
    """
    from hfprune.training.train import training_arguments

    with _quiet(), tempfile.TemporaryDirectory(prefix="hfprune-validate-") as tmp:
        _, tokens_per_step = training_arguments(train, seed, Path(tmp))
    return tokens_per_step


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    from hfprune import distributed

    # Under torchrun, building TrainingArguments would start the process group with transformers'
    # default timeout; hfprune's own group (with its long stage timeout) must come first.
    distributed.ensure_process_group()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _value_problems(args: dict[str, Any]) -> list[tuple[str, str]]:
    """Values of the wrong type for their TrainingArguments field, and counts that must be positive."""
    from transformers import TrainingArguments

    fields = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}
    problems = []
    for name, value in args.items():
        message = _type_problem(fields.get(name), value)
        if message is None and name in POSITIVE_ARGS and not value > 0:
            message = f"must be positive, got {value!r}"
        if message:
            problems.append((f"train.args.{name}", message))
    return problems


def _type_problem(field_type: Any, value: Any) -> str | None:
    """A message when `value` does not fit a field typed int, float or bool (other types: the builder)."""
    members = typing.get_args(field_type) if isinstance(field_type, types.UnionType) else (field_type,)
    simple = [t for t in members if t is not type(None)]
    if not simple or any(t not in _KINDS for t in simple) or (value is None and len(simple) < len(members)):
        return None
    if any(_fits(t, value) for t in simple):
        return None
    wanted = " or ".join(_KINDS[t] for t in simple)
    hint = ""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
        hint = f" (YAML reads {value} as text: write it with a dot, e.g. {_with_dot(value.strip())})"
    return f"must be {wanted}, got {value!r}{hint}"


def _fits(kind: type, value: Any) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, int) if kind is int else isinstance(value, int | float) and kind is float


def _with_dot(text: str) -> str:
    mantissa, exponent = re.split("[eE]", text)
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"


def _key(err: Exception, args: dict[str, Any]) -> str:
    """`train.args.<field>` for the first field the message names (or whose value it quotes)."""
    text = str(err)
    named = [name for name in args if _mentions(text, name)]
    named = named or [
        name for name, value in args.items() if isinstance(value, str) and _mentions(text, value)
    ]
    return f"train.args.{named[0]}" if named else "train.args"


def _mentions(text: str, word: str) -> bool:
    return bool(word) and re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text) is not None


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"rejected by transformers.TrainingArguments: {text}"
