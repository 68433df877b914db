"""Recipes: the typed, validated description of one experiment.

First stage of the pipeline. `load_recipe(path, overrides)` reads YAML and applies `key.path=value`
overrides (`hfprune.recipe.loading`), validates everything against the schema below (unknown keys
rejected), against the chosen pruner's own options schema and, for `train.args`, by building the
run's `TrainingArguments` (`hfprune.recipe.train_args`), and raises `RecipeError` listing every problem at
once with its key path. Downstream code gets a `Recipe`, not the YAML; its two free-form mappings,
`prune.options` (turned into the pruner's `Options` when the pruner is built) and `train.args` (passed to
`TrainingArguments`), stay dicts but were checked here. What needs the parent's config or the file system
is checked next, by `hfprune.checks.preflight`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from hfprune import kinds
from hfprune.pruners import METHODS, UnknownPrunerError, get_method
from hfprune.recipe.base import DatasetSpec, Strict, default_dataset
from hfprune.recipe.device import device_spec_problem
from hfprune.recipe.evaluation import EvalSpec
from hfprune.recipe.loading import RecipeError, read_recipe_yaml, validation_problems
from hfprune.recipe.loading import apply_overrides as _apply_overrides
from hfprune.recipe.train_args import training_args_problems
from hfprune.recipe.training import PretrainSpec, ScheduleSpec, TokenTraining
from hfprune.training.recovery.specs import DistillSpec, LoraSpec


class ParentSpec(Strict):
    """The model pruned: loaded from the Hub or a folder, or (with `pretrain`) made by hfprune itself and
    written to `model` (default `<output_dir>/models/parent`)."""

    model: str | None = Field(
        default=None,
        description="Hub repo id or local directory (with pretrain: where the parent is written)",
    )
    revision: str | None = None
    gguf_file: str | None = Field(default=None, description="GGUF file inside `model`, dequantized on load")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    hub_id: str | None = Field(
        default=None, description="Hub id recorded as `base_model` in cards when `model` is a local path"
    )
    device: str | int = Field(
        default="auto", description="auto (the accelerator when there is one) | cpu | cuda | cuda:N | N"
    )
    pretrain: PretrainSpec | None = Field(default=None, description="make the parent: pretrain a fresh Llama")
    pretrained_tokens: int | None = Field(
        default=None,
        gt=0,
        description="tokens the parent was pretrained on (from its card, e.g. 15e12 for Llama-3.1-8B); "
        "with `pretrain` it is the pretraining budget. The whole pipeline's budget for setting 2",
    )

    @model_validator(mode="after")
    def _source(self) -> ParentSpec:
        if self.pretrain is None and self.model is None:
            raise ValueError("give `model` (Hub id or folder), or a `pretrain` section to make the parent")
        if self.pretrain is not None:
            if self.pretrained_tokens not in (None, self.pretrain.token_budget):
                raise ValueError("pretrained_tokens is the pretrain section's token_budget: leave it out")
            if self.gguf_file or self.revision:
                raise ValueError("a pretrained-here parent is a local folder: no gguf_file or revision")
            object.__setattr__(self, "pretrained_tokens", self.pretrain.token_budget)
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str | int) -> str | int:
        problem = device_spec_problem(device)
        if problem:
            raise ValueError(problem)
        return device


class PruneSpec(Strict):
    method: str
    ratio: float = Field(gt=0, lt=1, description="fraction of non-embedding parameters (or weights) removed")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        try:
            get_method(method)
        except UnknownPrunerError as err:
            raise ValueError(str(err)) from None
        return method


class CalibrationSpec(Strict):
    dataset: DatasetSpec = Field(default_factory=lambda: default_dataset("train"))
    num_samples: int = Field(default=32, gt=0)
    seq_len: int = Field(default=512, gt=1)
    batch_size: int = Field(default=1, gt=0)


class TrainSpec(TokenTraining):
    """Continued training of the pruned model and of its random-init twin on the same token stream."""

    runs: list[str] = Field(
        default_factory=kinds.default_runs, min_length=1, description="trained model kinds (hfprune.kinds)"
    )
    reinit_embeddings_and_norms: bool = Field(
        default=True, description="the scratch twin re-initialises embeddings and norms too"
    )
    distill: DistillSpec | None = Field(
        default=None,
        description="logit distillation from the parent, for the runs that distil (e.g. distilled)",
    )
    lora: LoraSpec | None = Field(default=None, description="LoRA recovery, for the runs that use it (lora)")

    @model_validator(mode="after")
    def _recovery_defaults(self) -> TrainSpec:
        # A run that distils (or trains LoRA) without settings gets the defaults, written out in the
        # resolved recipe so the card and a rerun see them.
        if self.distill is None and set(self.runs) & set(kinds.recovering(kinds.Recovery.DISTILL)):
            object.__setattr__(self, "distill", DistillSpec())
        if self.lora is None and set(self.runs) & set(kinds.recovering(kinds.Recovery.LORA)):
            object.__setattr__(self, "lora", LoraSpec())
        return self

    @field_validator("runs")
    @classmethod
    def _unique_runs(cls, runs: list[str]) -> list[str]:
        allowed = kinds.trained_names()
        if unknown := [run for run in runs if run not in allowed]:
            raise ValueError(f"unknown run {unknown[0]!r}; allowed: {', '.join(allowed)}")
        if len(set(runs)) != len(runs):
            raise ValueError("each run may appear once")
        return runs


class PushSpec(Strict):
    """Publishing to the Hub: `<repo_prefix>` (continued), `-scratch`, `-pruned` (with `include_pruned`).

    The token comes from HF_TOKEN or the `hf auth login` cache, never from the recipe.
    """

    enabled: bool = False
    repo_prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
    private: bool = False
    include_pruned: bool = False
    retries: int = Field(default=3, ge=0, le=10, description="retries of a failed upload, with backoff")

    @model_validator(mode="after")
    def _prefix_when_enabled(self) -> PushSpec:
        if self.enabled and not self.repo_prefix:
            raise ValueError("repo_prefix (org/name) is required when enabled is true")
        return self


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str | None = None
    seed: int = 0
    parent: ParentSpec
    prune: PruneSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    train: TrainSpec | None = None
    push: PushSpec = Field(default_factory=PushSpec)

    @model_validator(mode="after")
    def _pipeline_budget(self) -> Recipe:
        if self.parent.pretrain is not None and self.parent.model is None:
            object.__setattr__(self.parent, "model", str(self.output_path / "models" / kinds.PARENT.name))
        pipeline_runs = [
            run for run in (self.train.runs if self.train else []) if kinds.get(run).budget_from_pipeline
        ]
        if pipeline_runs and self.parent.pretrained_tokens is None:
            raise ValueError(
                f"train.runs {pipeline_runs} train on the whole pipeline's tokens: give parent.pretrained_tokens "
                "(the parent's pretraining tokens, from its card) or a parent.pretrain section"
            )
        return self

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def token_budget(self, kind: str) -> int:
        """The tokens `kind` trains on: `train.token_budget`, plus the parent's pretraining tokens for a kind
        that gets the whole pipeline's budget (setting 2 of the study)."""
        assert self.train is not None
        extra = (self.parent.pretrained_tokens or 0) if kinds.get(kind).budget_from_pipeline else 0
        return self.train.token_budget + extra

    def train_spec(self, kind: str) -> TrainSpec:
        """`train` as `kind` trains it (its own token budget)."""
        assert self.train is not None
        return self.train.model_copy(update={"token_budget": self.token_budget(kind)})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named top-level sections: a stage's inputs, for skip-on-rerun.

        Keys of `PLACEMENT_KEYS` are left out: where a model runs does not change what a finished stage
        made, so moving a run to another device (or adding such a key) never reruns finished stages.
        """
        dump = self.model_dump(mode="json")
        for section, key in PLACEMENT_KEYS:
            if isinstance(dump.get(section), dict):
                dump[section].pop(key, None)
        for section, key in OPTIONAL_KEYS:  # unset (or at their default), they hash as before they existed
            if isinstance(dump.get(section), dict) and dump[section].get(key) in (
                None,
                LATER_DEFAULTS.get(key),
            ):
                dump[section].pop(key, None)
        data = {key: dump[key] for key in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# (section, key) pairs of optional settings added later: left out of a fingerprint while unset, so a run
# made before they existed stays current.
OPTIONAL_KEYS = (
    ("train", "distill"),
    ("train", "lora"),
    ("train", "schedule"),
    ("parent", "pretrain"),
    ("parent", "pretrained_tokens"),
)
LATER_DEFAULTS = {"schedule": ScheduleSpec().model_dump(mode="json")}  # the behaviour before the key existed

# (section, key) pairs that say where work runs, not what it computes: not part of any fingerprint.
PLACEMENT_KEYS = (("parent", "device"),)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raise `RecipeError` with every problem found."""
    source = str(path)
    raw = read_recipe_yaml(path)
    if "sweep" in raw:
        raise RecipeError(
            source, [("sweep", "this recipe is a sweep: run it with `hfprune sweep` (one cell: --only)")]
        )
    problems = apply_overrides(raw, overrides)
    return validate_recipe(raw, source, problems)


def validate_recipe(
    raw: dict[str, Any], source: str, problems: list[tuple[str, str]] | None = None
) -> Recipe:
    problems = list(problems or [])
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems += validation_problems(err)
    problems += _pruner_problems(raw.get("prune"))
    problems += _train_args_problems(raw)
    if problems:
        raise RecipeError(source, problems)
    assert recipe is not None
    return recipe


def _train_args_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """`train.args` checked by building the run's TrainingArguments, even when other sections are wrong."""
    train = raw.get("train")
    if not isinstance(train, dict) or not train.get("args"):
        return []
    try:
        spec = TrainSpec.model_validate(train)
    except ValidationError:
        return []  # reported with the rest of the recipe
    seed = raw.get("seed", 0)
    return training_args_problems(spec, seed if isinstance(seed, int) else 0)


def _pruner_problems(prune: Any) -> list[tuple[str, str]]:
    """Validate `prune.options` with the method's own schema, even when other keys are wrong."""
    if not isinstance(prune, dict) or prune.get("method") not in METHODS:
        return []
    schema = METHODS[prune["method"]].options
    problems = schema.problems(prune.get("options") or {})
    ratio = prune.get("ratio")
    if not problems and isinstance(ratio, int | float) and 0 < ratio < 1:
        message = schema(**(prune.get("options") or {})).ratio_problem(float(ratio))
        if message:
            problems.append(("ratio", message))
    return [(f"prune.{path}", msg) for path, msg in problems]


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Set `key.path=value` overrides in place, typed by the recipe schema (see `recipe_raw`)."""
    return _apply_overrides(raw, overrides, Recipe)
