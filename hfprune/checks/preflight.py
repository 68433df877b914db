"""Pre-flight: everything the recipe, the file system and the parent's config can tell before any work.

Runs right after `load_recipe` (or `load_sweep`) and before any stage: `hfprune run`, `prune` and
`sweep` call it before the first weight is loaded or the output folder is created, `hfprune validate`
too. It reads the parent's config only (`hfprune.hub.load_parent_config`: config.json or the GGUF
header, never weights) and checks:

- sequence lengths (`train.seq_len`, `calibration.seq_len`, each `eval.perplexity[i].seq_len`)
  against the parent's `max_position_embeddings`, and the architecture (`modeling.check_supported`);
- the token budget against one optimizer step (per-device batch x accumulation x processes x seq_len);
- local dataset files (`data_files` of the `json`, `text`, ... builders or of a local folder): present,
  files, readable, not empty;
- the output folder: a folder, or creatable, and writable.

Every problem is reported at once, as a `RecipeError` (exit 2). A parent that cannot be found or
fetched stays a `ParentLoadError` (exit 1) when nothing else is wrong.

Then, with the parent's config at hand: the held-out check (`hfprune.checks.heldout`: an evaluation set that
reads calibration or training text is a warning, returned and logged), and when a `hardware` is given
(the run commands, not `validate`) the plan (`hfprune.plan.check`): logged, and a `PlanError` (exit 2,
naming the knob) when a stage needs more memory than that machine has, or the stages still to run (the
ledger's, as `hfprune.pipeline.runner.Pipeline.status` reads it; all of them with `force`) more disk than
the output folder's file system has free, unless `refuse=False` (a dry run, which prints it instead).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfprune.plan.check import Checked, after_checks, in_cells
from hfprune.recipe.base import DatasetSpec
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import Recipe


if TYPE_CHECKING:
    from hfprune.plan.hardware import Hardware


logger = logging.getLogger(__name__)

Problem = tuple[str, str]

# `datasets` builders that read local files named by `data_files` (relative to the working folder).
_FILE_BUILDERS_FALLBACK = {"arrow", "csv", "json", "pandas", "parquet", "text", "webdataset", "xml"}
_ASSET_CACHE = ".cache/hfprune"


def preflight(
    recipe: Recipe,
    *,
    source: str | None = None,
    parent: bool = True,
    files: bool = True,
    training: bool = True,
    hardware: Hardware | None = None,
    refuse: bool = True,
    log: bool = True,
    force: bool = False,
) -> Checked:
    """Raise `RecipeError` with every problem found; return the warnings (and the plan).

    `parent=False` skips the parent-config checks, `files=False` those of dataset files and the output
    folder (`hfprune validate --no-parent --no-files`: what the recipe alone says, on any machine);
    `training=False` (`hfprune prune`, which stops before training) skips the `train` section.
    `hardware` asks for the plan on that machine (`PlanError` when it does not fit and `refuse`);
    `log=False` leaves the held-out warnings to the caller (`validate` prints them); `force` (a run that
    reruns finished stages) plans the disk of every stage.
    """
    items = [(None, recipe)]
    configs = _check(source or recipe.name, items, parent=parent, files=files, training=training)
    remaining = {None: to_run(recipe, training=training, force=force)} if hardware else None
    return after_checks(
        items, configs, hardware, refuse=refuse, training=training, log=log, remaining=remaining
    )


def preflight_cells(
    cells: Iterable[Any],
    *,
    source: str,
    parent: bool = True,
    files: bool = True,
    hardware: Hardware | None = None,
    refuse: bool = True,
    log: bool = True,
    force: bool = False,
) -> Checked:
    """`preflight` for sweep cells (`hfprune.sweep.grid.Cell`): one report, each problem naming its cells."""
    items = [(cell.id, cell.recipe) for cell in cells]
    configs = _check(source, items, parent=parent, files=files, training=True)
    remaining = {label: to_run(r, training=True, force=force) for label, r in items} if hardware else None
    return after_checks(items, configs, hardware, refuse=refuse, training=True, log=log, remaining=remaining)


def to_run(recipe: Recipe, *, training: bool, force: bool) -> set[str] | None:
    """The stages a run of `recipe` would run, from its ledger (None: every stage, with `force`)."""
    if force:
        return None
    from hfprune.pipeline.runner import Pipeline

    status = Pipeline(recipe).status(None if training else "prune")
    return {stage for stage, state in status.items() if state == "will run"}


def _check(
    source: str, items: list[tuple[str | None, Recipe]], *, parent: bool, files: bool, training: bool
) -> dict[str | None, Any]:
    """Raise `RecipeError` with every problem; the parent config of each item (by label) when read."""
    per_recipe: dict[Problem, list[str | None]] = {}
    for label, recipe in items:
        for problem in recipe_problems(recipe, training=training, files=files):
            per_recipe.setdefault(problem, []).append(label)
    shared: list[Problem] = []
    found: dict[str | None, Any] = {}
    if parent:
        configs: dict[str, Any] = {}  # the cells of a sweep share their parent: its config is read once
        for label, recipe in items:
            key = recipe.parent.model_dump_json()
            if key not in configs:
                configs[key] = _parent_config(recipe, shared, pending=bool(per_recipe or shared))
            found[label] = configs[key]
            if configs[key] is not None:
                for problem in config_problems(recipe, configs[key], training=training):
                    per_recipe.setdefault(problem, []).append(label)
    problems = shared + [
        (key, in_cells(msg, labels, len(items))) for (key, msg), labels in per_recipe.items()
    ]
    if problems:
        raise RecipeError(source, problems)
    return found


def _parent_config(recipe: Recipe, problems: list[Problem], *, pending: bool) -> Any:
    """The parent's config, or None with the reason added to `problems` when it cannot be checked."""
    from hfprune.architectures.registry import UnsupportedArchitectureError, check_supported
    from hfprune.hub import ParentLoadError, load_parent_config

    try:
        config = load_parent_config(recipe.parent)
        check_supported(config)
    except UnsupportedArchitectureError as err:
        problems.append(("parent.model", str(err)))
        return None
    except ParentLoadError as err:
        if not pending:
            raise  # a run-time failure (exit 1), as when the run itself loads the parent
        problems.append(("parent", f"not checked (sequence lengths, architecture): {err}"))
        return None
    return config


# -- checks that need the parent's config ---------------------------------------------------------


def config_problems(recipe: Recipe, config: Any, *, training: bool = True) -> list[Problem]:
    """Sequence lengths longer than the parent's positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return []
    lengths = [
        (f"eval.perplexity.{i}.seq_len", spec.seq_len) for i, spec in enumerate(recipe.eval.perplexity)
    ]
    if _needs_calibration(recipe):
        lengths.insert(0, ("calibration.seq_len", recipe.calibration.seq_len))
    if training and recipe.train is not None:
        lengths.insert(0, ("train.seq_len", recipe.train.seq_len))
    return [
        (
            key,
            f"{value} is longer than the parent's {limit} positions (max_position_embeddings): use at most {limit}",
        )
        for key, value in lengths
        if value > limit
    ]


def _needs_calibration(recipe: Recipe) -> bool:
    from hfprune.pruners import METHODS

    return METHODS[recipe.prune.method].needs_calibration


# -- checks from the recipe and the file system -----------------------------------------------------


def recipe_problems(recipe: Recipe, *, training: bool = True, files: bool = True) -> list[Problem]:
    """The token budget and, with `files`, local dataset files and the output folder."""
    datasets = [
        (f"eval.perplexity.{i}.dataset", spec.dataset) for i, spec in enumerate(recipe.eval.perplexity)
    ]
    if _needs_calibration(recipe):
        datasets.insert(0, ("calibration.dataset", recipe.calibration.dataset))
    problems = []
    if training and recipe.train is not None:
        datasets.insert(0, ("train.dataset", recipe.train.dataset))
        problems += _budget_problems(recipe)
    if recipe.parent.pretrain is not None:  # `hfprune prune` pretrains the parent too
        from hfprune.training.pretrain import pretrain_problems

        datasets.insert(0, ("parent.pretrain.dataset", recipe.parent.pretrain.dataset))
        problems += pretrain_problems(recipe)
    if not files:
        return problems
    for key, spec in datasets:
        problems += dataset_problems(key, spec)
    message = output_problem(recipe.output_path)
    return problems + ([("output_dir", message)] if message else [])


def _budget_problems(recipe: Recipe) -> list[Problem]:
    from hfprune.recipe.train_args import build_training_arguments
    from hfprune.training.train import TrainingSetupError

    try:
        build_training_arguments(recipe.train, recipe.seed)
    except TrainingSetupError as err:
        return [("train.token_budget", str(err).removeprefix("train.token_budget "))]
    return []


def dataset_problems(key: str, spec: DatasetSpec) -> list[Problem]:
    """Local `data_files` that are missing, folders, unreadable or empty (Hub datasets are not checked)."""
    base = _local_base(spec.path)
    if spec.data_files is None or base is None:
        return []
    problems = []
    for pattern in _patterns(spec.data_files):
        message = None if "://" in pattern else _file_problem(base, pattern)
        if message:
            problems.append((f"{key}.data_files", message))
    return problems


def _local_base(path: str) -> Path | None:
    """Where `data_files` are resolved: the working folder for file builders, a local dataset folder."""
    if path in _file_builders():
        return Path()
    folder = Path(path).expanduser()
    return folder if not path.startswith("hfprune:") and folder.is_dir() else None


def _file_builders() -> set[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:
        return _FILE_BUILDERS_FALLBACK
    return set(_PACKAGED_DATASETS_MODULES)


def _patterns(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for files in data_files.values() for p in _patterns(files)]
    return list(data_files)


def _file_problem(base: Path, pattern: str) -> str | None:
    path = base / Path(pattern).expanduser()
    where = f"{pattern} (in {base.resolve()})" if not path.is_absolute() else pattern
    hint = " (fetch the demo assets with `hfprune assets`)" if pattern.startswith(_ASSET_CACHE) else ""
    if glob.has_magic(pattern):
        return None if glob.glob(str(path), recursive=True) else f"{where} matches no file{hint}"
    if not path.exists():
        return f"{where} does not exist{hint}"
    if not path.is_file():
        return f"{where} is a folder, not a file: name the files (e.g. {pattern.rstrip('/')}/*.jsonl)"
    if not os.access(path, os.R_OK):
        return f"{where} is not readable (check its permissions)"
    if path.stat().st_size == 0:
        return f"{where} is empty"
    return None


def output_problem(output: Path) -> str | None:
    """Why the output folder cannot be used: a file in its place, or no permission to create or write it."""
    if output.exists() and not output.is_dir():
        return f"{output} is a file, not a folder: choose another output_dir or move the file"
    existing = next((p for p in (output, *output.absolute().parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"{existing} is a file, so the output folder cannot be created inside it"
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == output:
            return f"{output} is not writable (check its permissions)"
        return f"the output folder cannot be created: {existing} is not writable"
    return None
