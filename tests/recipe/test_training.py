"""The training sections of a recipe: what they count before transformers is imported."""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from hfprune.recipe.training import TRAINER_DEFAULT_BATCH, per_device_batch


def test_the_default_batch_is_the_installed_trainers():
    fields = {field.name: field for field in dataclasses.fields(TrainingArguments)}
    assert fields["per_device_train_batch_size"].default == TRAINER_DEFAULT_BATCH
    assert (
        per_device_batch({}) == TRAINER_DEFAULT_BATCH
        and per_device_batch({"per_device_train_batch_size": 2}) == 2
    )
