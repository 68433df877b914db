"""The `eval` section of a recipe: held-out perplexity sets and lm-evaluation-harness tasks.

Read by the evaluation stages (`hfprune.pipeline.stages.evaluate`, `hfprune.eval.perplexity`, `hfprune.eval.lmeval`) for every
model kind of a run; `hfprune.recipe.schema` assembles it into the `Recipe`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from hfprune.checks.heldout import held_out_split
from hfprune.recipe.base import DatasetSpec, Strict, default_dataset


class PerplexitySpec(Strict):
    name: str
    dataset: DatasetSpec
    seq_len: int = Field(default=512, gt=1)
    max_windows: int | None = Field(
        default=64, gt=0, description="at most this many windows, spread evenly over the whole set"
    )
    window_selection: Literal["spread"] = Field(
        default="spread",
        description="how max_windows picks windows: evenly spaced over the whole text (a streamed set: over "
        "its first hfprune.data.texts.STREAMED_READ_MULTIPLE x max_windows windows); part of the "
        "evaluation's fingerprint, so scores measured on a set's head, before it existed, are not current",
    )

    @model_validator(mode="before")
    @classmethod
    def _held_out_by_default(cls, data: Any) -> Any:
        """An evaluation set naming no split reads its dataset's held-out split where one is known
        (`hfprune.checks.heldout.held_out_split`: wikitext test, c4 validation); else the loader's default."""
        dataset = data.get("dataset") if isinstance(data, dict) else None
        if isinstance(dataset, dict) and "split" not in dataset and isinstance(dataset.get("path"), str):
            split = held_out_split(dataset["path"], dataset.get("data_files"))
            if split is not None:
                return {**data, "dataset": {**dataset, "split": split}}
        return data


class LmEvalTask(Strict):
    """One lm-evaluation-harness task at one number of shots, and the metric reported for it."""

    task: str
    num_fewshot: int | None = Field(default=None, ge=0, description="default: eval.lm_eval.num_fewshot")
    metric: str = Field(default="acc", description="the metric key reported (acc, acc_norm, f1, ...)")
    in_average: bool | None = Field(
        default=None,
        description="counted in the headline average; default: unless the metric is a perplexity",
    )


class LmEvalSpec(Strict):
    """lm-evaluation-harness on the in-memory models; tasks add to those of `eval.preset`."""

    tasks: list[LmEvalTask] = Field(default_factory=list)
    num_fewshot: int = Field(default=0, ge=0)
    limit: int | float | None = Field(
        default=None, description="documents per task (a float < 1: a fraction)"
    )
    batch_size: int | None = Field(default=None, gt=0, description="default: eval.batch_size")
    include_path: list[str] = Field(default_factory=list, description="folders of local task YAMLs")
    seed: int = Field(default=1234, description="lm-eval's random, numpy, torch and few-shot seeds")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, tasks: Any) -> Any:
        # A bare task name is shorthand for {task: name}.
        return [{"task": t} if isinstance(t, str) else t for t in tasks] if isinstance(tasks, list) else tasks

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_path(cls, paths: Any) -> Any:
        return [paths] if isinstance(paths, str) else paths

    @field_validator("limit")
    @classmethod
    def _limit(cls, limit: float | None) -> float | None:
        if limit is not None and not ((isinstance(limit, int) and limit >= 1) or 0 < limit < 1):
            raise ValueError("a number of documents (int >= 1) or a fraction of them (0 < float < 1)")
        return limit


class EvalSpec(Strict):
    perplexity: list[PerplexitySpec] = Field(
        default_factory=lambda: [PerplexitySpec(name="pydoc", dataset=default_dataset("test"))]
    )
    batch_size: int = Field(default=4, gt=0)
    preset: Literal["paper", "quick"] | None = Field(
        default=None, description="lm-eval suite: `paper` (the study's tasks and shots) or `quick` (offline)"
    )
    lm_eval: LmEvalSpec = Field(default_factory=LmEvalSpec)
    every_tokens: int | None = Field(
        default=None,
        gt=0,
        description="during training, held-out perplexity (first perplexity set) every this many tokens",
    )

    @model_validator(mode="after")
    def _tasks_resolve(self) -> EvalSpec:
        from hfprune.eval.lmeval import resolve_tasks

        resolve_tasks(self)  # raises ValueError naming a task given twice at the same shots
        return self
