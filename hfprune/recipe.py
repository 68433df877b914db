"""Recipes: the typed, validated description of one experiment.

First stage of the pipeline. `load_recipe(path, overrides)` reads YAML and applies `key.path=value`
overrides (`hfprune.recipe_raw`), validates everything against the schema below (unknown keys
rejected), against the chosen pruner's own options schema and, for `train.args`, by building the
run's `TrainingArguments` (`hfprune.train_args`), and raises `RecipeError` listing every problem at
once with its key path. Downstream code gets a `Recipe`, not the YAML; its two free-form mappings,
`prune.options` (turned into the pruner's `Options` when the pruner is built) and `train.args` (passed to
`TrainingArguments`), stay dicts but were checked here. What needs the parent's config or the file system
is checked next, by `hfprune.preflight`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from hfprune import kinds
from hfprune.device_spec import device_spec_problem
from hfprune.pruners import PRUNERS, UnknownPrunerError, get_pruner
from hfprune.recipe_eval import EvalSpec
from hfprune.recipe_raw import RecipeError, read_recipe_yaml
from hfprune.recipe_raw import apply_overrides as _apply_overrides
from hfprune.recovery.specs import DistillSpec, LoraSpec
from hfprune.schema import DatasetSpec, Strict, default_dataset
from hfprune.train_args import training_args_problems


class ParentSpec(Strict):
    model: str = Field(description="Hub repo id or local directory")
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
            get_pruner(method)
        except UnknownPrunerError as err:
            raise ValueError(str(err)) from None
        return method


class CalibrationSpec(Strict):
    dataset: DatasetSpec = Field(default_factory=lambda: default_dataset("train"))
    num_samples: int = Field(default=32, gt=0)
    seq_len: int = Field(default=512, gt=1)
    batch_size: int = Field(default=1, gt=0)


# TrainingArguments that hfprune derives itself; a recipe setting them would silently be overridden.
DERIVED_TRAINING_ARGS = {
    "output_dir": "set by hfprune under <output_dir>/.hfprune/train",
    "max_steps": "derived from train.token_budget",
    "num_train_epochs": "derived from train.token_budget",
    "lr_scheduler_type": "cosine to a floor, derived from train.token_budget",
    "lr_scheduler_kwargs": "use train.min_lr_ratio",
    "warmup_steps": "use train.warmup_ratio",
    "warmup_ratio": "use train.warmup_ratio",
    "include_num_input_tokens_seen": "always 'non_padding' (exact token accounting)",
    "seed": "use the recipe's seed",
    "data_seed": "use the recipe's seed",
}


class TrainSpec(Strict):
    """Continued training of the pruned model and of its random-init twin on the same token stream."""

    runs: list[str] = Field(
        default_factory=kinds.default_runs, min_length=1, description="trained model kinds (hfprune.kinds)"
    )
    token_budget: int = Field(gt=0, description="tokens each model trains on (summed over processes)")
    dataset: DatasetSpec = Field(default_factory=lambda: default_dataset("train"))
    seq_len: int = Field(default=512, gt=1)
    skip_tokens: int = Field(default=0, ge=0, description="start the stream after this many tokens")
    shuffle_buffer: int = Field(default=1000, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    reinit_embeddings_and_norms: bool = Field(
        default=True, description="the scratch twin re-initialises embeddings and norms too"
    )
    args: dict[str, Any] = Field(default_factory=dict, description="passed to transformers.TrainingArguments")
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

    @field_validator("args")
    @classmethod
    def _known_training_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        import dataclasses

        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments)}
        problems = []
        for key in args:
            if key in DERIVED_TRAINING_ARGS:
                problems.append(f"{key!r} cannot be set here ({DERIVED_TRAINING_ARGS[key]})")
            elif key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{key!r} is not a TrainingArguments field{hint}")
        if problems:
            raise ValueError("; ".join(problems))
        return args


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

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

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
        for section, key in OPTIONAL_KEYS:  # unset, they hash as before they existed
            if isinstance(dump.get(section), dict) and dump[section].get(key) is None:
                dump[section].pop(key, None)
        data = {key: dump[key] for key in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# (section, key) pairs of optional settings added later: left out of a fingerprint while unset, so a run
# made before they existed stays current.
OPTIONAL_KEYS = (("train", "distill"), ("train", "lora"))

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
    if not isinstance(prune, dict) or prune.get("method") not in PRUNERS:
        return []
    pruner_cls = PRUNERS[prune["method"]]
    problems = pruner_cls.options_problems(prune.get("options") or {})
    ratio = prune.get("ratio")
    if not problems and isinstance(ratio, int | float) and 0 < ratio < 1:
        message = pruner_cls(pruner_cls.Options(**(prune.get("options") or {}))).ratio_problem(float(ratio))
        if message:
            problems.append(("ratio", message))
    return [(f"prune.{path}", msg) for path, msg in problems]


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Set `key.path=value` overrides in place, typed by the recipe schema (see `recipe_raw`)."""
    return _apply_overrides(raw, overrides, Recipe)


def validation_problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(key path, message) for every error pydantic found, paths starting with `prefix`."""
    return [(prefix + _path(e["loc"]), _message(e)) for e in err.errors()]


def _path(loc: tuple[Any, ...]) -> str:
    # pydantic adds the union member it tried ('str', 'list[str]'); users only care about their keys.
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "int"})))


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return error["msg"].removeprefix("Value error, ")
