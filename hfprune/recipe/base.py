"""Building blocks of the recipe schema shared by its sections (`hfprune.recipe.schema`, `hfprune.recipe.evaluation`,
`hfprune.training.recovery.specs`): the strict base model and the dataset spec every stage reads text through.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, and a validated section is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(Strict):
    """`datasets.load_dataset` arguments plus the column holding text.

    `path` also accepts `hfprune:pydoc_topics`, the Python documentation that ships with every
    interpreter, so recipes work with no download at all.
    """

    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    streaming: bool = False
    text_field: str = "text"


def default_dataset(split: str) -> DatasetSpec:
    """The Python documentation that ships with every interpreter: the offline default."""
    return DatasetSpec(path="hfprune:pydoc_topics", split=split)
