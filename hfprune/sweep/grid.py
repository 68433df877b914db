"""Sweep recipes: a recipe's `sweep:` section expanded into a grid of ordinary recipes, one per cell.

The first step of `hfprune sweep`. `load_sweep` reads a recipe with a `sweep:` section (lists of
`method`, `ratio` and `token_budget`, each replacing the base recipe's key of the same name, plus
`options` per method), validates every cell as a complete recipe (problems of all cells at once, each
naming the cells it concerns) and gives each cell its own output folder under the sweep's.
`Sweep.select` picks cells for `--only method=wanda,ratio=0.5`. Running the grid is `hfprune.sweep.runner`.

Seed replicates: `sweep.seed: [0, 1, 2]` replaces the recipe's `seed` and replays the whole pipeline
per seed (its own pretrained parent under `<sweep>/models/parent-seed<N>`, data order and
initialisations, all from `hfprune.seeds`); `sweep.replicate_methods` limits the replicates to some
methods (the others run at the first seed only, and the report borrows the noise measured on the
replicated ones). With several seeds a cell's folder ends in `-s<seed>`; with one, names are unchanged.
`sweep.control: true` adds one `Control` per seed (`hfprune.sweep.control`): the parent's own shape
trained from scratch on the parent's pretraining tokens through the train stage's `train_model`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from hfprune.errors import InvalidInput
from hfprune.pruners import UnknownPrunerError, get_method
from hfprune.recipe.loading import RecipeError, read_recipe_yaml, validation_problems
from hfprune.recipe.schema import Recipe, apply_overrides, validate_recipe
from hfprune.training.schedules import pin_shared_warmup


SELECTOR_KEYS = {
    "method": "method",
    "ratio": "ratio",
    "budget": "token_budget",
    "token_budget": "token_budget",
    "seed": "seed",
}


class SweepError(InvalidInput, ValueError):
    """A bad `--only` selection; the message lists the grid's values."""


class SweepSpec(BaseModel):
    """The `sweep:` section: each axis replaces the base recipe's key of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: list[str] | None = Field(default=None, min_length=1, description="replaces prune.method")
    ratio: list[float] | None = Field(default=None, min_length=1, description="replaces prune.ratio")
    token_budget: list[PositiveInt] | None = Field(
        default=None, min_length=1, description="replaces train.token_budget"
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="prune.options per method, e.g. {minitron_width: {alignment: 8}}"
    )
    seed: list[int] | None = Field(
        default=None,
        min_length=1,
        description="replaces the recipe's seed: one replicate of the pipeline each",
    )
    replicate_methods: list[str] | None = Field(
        default=None, min_length=1, description="methods run at every seed (the others at the first only)"
    )
    control: bool = Field(
        default=False,
        description="per seed, the parent's shape trained from scratch on its pretraining tokens",
    )

    @field_validator("seed")
    @classmethod
    def _seeds(cls, values: list[int] | None) -> list[int] | None:
        if values is not None and any(not 0 <= v < 2**31 for v in values):
            raise ValueError("seeds are non-negative 31-bit integers")
        return values

    @field_validator("method", "ratio", "token_budget", "seed", "replicate_methods")
    @classmethod
    def _distinct(cls, values: list[Any] | None) -> list[Any] | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError("each value may appear once")
        return values


@dataclass(frozen=True)
class Cell:
    """One point of the grid and the complete recipe that runs it."""

    method: str
    ratio: float
    token_budget: int | None
    recipe: Recipe
    replicated: bool = False  # the sweep has several seeds: the id names this cell's

    @property
    def id(self) -> str:
        return cell_id(self.method, self.ratio, self.token_budget, self.seed if self.replicated else None)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def value(self, axis: str) -> Any:
        return getattr(self, axis)


def cell_id(method: str, ratio: float, token_budget: int | None, seed: int | None = None) -> str:
    """The cell's folder name, e.g. `wanda-r0.5-t16384` (`wanda-r0.5-t16384-s1` in a sweep of seeds)."""
    budget = f"-t{token_budget}" if token_budget is not None else ""
    return f"{method}-r{ratio:g}{budget}" + (f"-s{seed}" if seed is not None else "")


def seed_suffix(seed: int, replicated: bool, sep: str = "-s") -> str:
    """What a seed adds to a per-seed name: nothing in a sweep of one seed (names as before seeds)."""
    return f"{sep}{seed}" if replicated else ""


@dataclass(frozen=True)
class Control:
    """The pipeline's control for one seed: the parent's shape trained from scratch (another init seed)
    on the parent's pretraining tokens, with the train section the twins use (`hfprune.sweep.control`)."""

    seed: int
    recipe: Recipe  # a cell recipe of this seed: its parent, train and eval sections
    output_path: Path

    @property
    def id(self) -> str:
        return self.output_path.name


@dataclass(frozen=True)
class Sweep:
    name: str
    source: str
    output_path: Path
    cells: list[Cell]
    controls: list[Control] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return self.axis("seed")

    def axis(self, name: str) -> list[Any]:
        """The distinct values of one axis (method, ratio, token_budget), in grid order."""
        return list(dict.fromkeys(cell.value(name) for cell in self.cells))

    def select(self, selectors: Iterable[str] = ()) -> list[Cell]:
        """Cells matching any selector (`method=wanda,ratio=0.5`); all cells without selectors."""
        parsed = [self._parse_selector(text) for text in selectors]
        if not parsed:
            return list(self.cells)
        return [cell for cell in self.cells if any(_matches(cell, wanted) for wanted in parsed)]

    def _parse_selector(self, text: str) -> dict[str, Any]:
        wanted: dict[str, Any] = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            axis = SELECTOR_KEYS.get(key.strip())
            if not sep or axis is None:
                raise SweepError(
                    f"--only {text!r}: expected key=value pairs with keys method, ratio, budget, seed"
                )
            values = self.axis(axis)
            match = next((v for v in values if _same(v, value.strip())), None)
            if match is None:
                listed = ", ".join(map(str, values))
                raise SweepError(f"--only {text!r}: {key} {value!r} is not in this sweep (it has: {listed})")
            wanted[axis] = match
        return wanted


def _same(grid_value: Any, text: str) -> bool:
    if isinstance(grid_value, float):
        try:
            return abs(grid_value - float(text)) < 1e-12
        except ValueError:
            return False
    return str(grid_value) == text


def _matches(cell: Cell, wanted: dict[str, Any]) -> bool:
    return all(cell.value(axis) == value for axis, value in wanted.items())


# -- loading -----------------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: Iterable[str] = ()) -> Sweep:
    """Read a sweep recipe, apply overrides and validate every cell; `RecipeError` lists all problems."""
    source = str(path)
    raw = read_recipe_yaml(path)
    problems = apply_overrides(raw, tuple(overrides))
    sweep_raw = raw.pop("sweep", None)
    if not isinstance(sweep_raw, dict):
        problems.append(
            ("sweep", "a sweep recipe needs a `sweep:` section (method, ratio, token_budget lists)")
        )
        raise RecipeError(source, problems)
    try:
        spec = SweepSpec.model_validate(sweep_raw)
    except ValidationError as err:
        raise RecipeError(source, problems + validation_problems(err, "sweep.")) from None
    axes, axis_problems = _axes(spec, raw)
    problems += axis_problems
    if problems:
        raise RecipeError(source, problems)
    name = str(raw.get("name", "sweep"))
    output = Path(raw.get("output_dir") or f"runs/{name}")
    replicated = len(axes["seed"]) > 1
    cells, cell_problems = [], {}
    for method, ratio, budget, seed in _points(axes, spec):
        ident = cell_id(method, ratio, budget, seed if replicated else None)
        cell_raw = _cell_raw(raw, spec, (method, ratio, budget, seed), output, replicated)
        cell_raw["name"], cell_raw["output_dir"] = f"{name}-{ident}", str(output / ident)
        try:
            recipe = validate_recipe(cell_raw, source)
            cells.append(Cell(method, ratio, budget, recipe, replicated=replicated))
        except RecipeError as err:
            for problem in err.problems:
                cell_problems.setdefault(problem, []).append(ident)
    if cell_problems:
        raise RecipeError(
            source, [(key, f"{msg} (cells: {', '.join(ids)})") for (key, msg), ids in cell_problems.items()]
        )
    # Budget branches (wsd) of one model warm up alike: the warmup goes into every cell's recipe.
    recipes = pin_shared_warmup([cell.recipe for cell in cells])
    cells = [replace(cell, recipe=recipe) for cell, recipe in zip(cells, recipes, strict=True)]
    return Sweep(name, source, output, cells, _controls(spec, cells, output))


def _points(axes: dict[str, list[Any]], spec: SweepSpec) -> Iterable[tuple[str, float, int | None, int]]:
    """The grid's points in order; methods outside `replicate_methods` at the first seed only."""
    for method in axes["method"]:
        replicated = spec.replicate_methods is None or method in spec.replicate_methods
        for ratio in axes["ratio"]:
            for budget in axes["token_budget"]:
                for seed in axes["seed"] if replicated else axes["seed"][:1]:
                    yield method, ratio, budget, seed


def _controls(spec: SweepSpec, cells: list[Cell], output: Path) -> list[Control]:
    """One control per seed (`sweep.control`), beside the cells: `<sweep>/control[-s<seed>]`."""
    if not spec.control:
        return []
    seeds = list(dict.fromkeys(cell.seed for cell in cells))
    first = {seed: next(cell for cell in cells if cell.seed == seed) for seed in seeds}
    return [
        Control(seed, first[seed].recipe, output / f"control{seed_suffix(seed, len(seeds) > 1)}")
        for seed in seeds
    ]


def _axes(spec: SweepSpec, raw: dict[str, Any]) -> tuple[dict[str, list[Any]], list[tuple[str, str]]]:
    """Each axis from `sweep:` or, when not swept, the base recipe's single value."""
    prune = raw.get("prune") if isinstance(raw.get("prune"), dict) else {}
    train = raw.get("train") if isinstance(raw.get("train"), dict) else None
    problems: list[tuple[str, str]] = []
    axes: dict[str, list[Any]] = {}
    for axis, section, where in (("method", prune, "prune"), ("ratio", prune, "prune")):
        swept, base = getattr(spec, axis), section.get(axis)
        if swept is not None and base is not None:
            problems.append((f"{where}.{axis}", f"also given as sweep.{axis}: keep one"))
        elif swept is None and base is None:
            problems.append((f"sweep.{axis}", f"give a list here, or a single {where}.{axis}"))
        axes[axis] = swept if swept is not None else [base]
    if spec.token_budget is not None and train is None:
        problems.append(("sweep.token_budget", "needs a train section (the budgets are its token_budget)"))
    elif spec.token_budget is not None and "token_budget" in train:
        problems.append(("train.token_budget", "also given as sweep.token_budget: keep one"))
    axes["token_budget"] = spec.token_budget or ([train.get("token_budget")] if train else [None])
    if spec.method is not None and prune.get("options"):
        problems.append(("prune.options", "options are per method in a method sweep: sweep.options.<method>"))
    for method in spec.options:
        if method not in axes["method"]:
            problems.append((f"sweep.options.{method}", f"not a method of this sweep ({axes['method']})"))
    for index, method in enumerate(axes["method"] if spec.method else []):
        try:
            get_method(method)
        except UnknownPrunerError as err:
            problems.append((f"sweep.method.{index}", str(err)))
    axes["seed"], seed_problems = _seed_axis(spec, raw, axes["method"])
    return axes, problems + seed_problems


def _seed_axis(
    spec: SweepSpec, raw: dict[str, Any], methods: list[Any]
) -> tuple[list[int], list[tuple[str, str]]]:
    """The seeds (`sweep.seed`, or the recipe's one), and what replicates and the control need."""
    problems: list[tuple[str, str]] = []
    if spec.seed is not None and "seed" in raw:
        problems.append(("seed", "also given as sweep.seed: keep one"))
    base = raw.get("seed", 0)
    seeds = spec.seed if spec.seed is not None else [base if isinstance(base, int) else 0]
    if spec.replicate_methods is not None and len(seeds) < 2:
        problems.append(("sweep.replicate_methods", "needs sweep.seed with two or more seeds to replicate"))
    for method in spec.replicate_methods or []:
        if method not in methods:
            problems.append((f"sweep.replicate_methods.{method}", f"not a method of this sweep ({methods})"))
    parent = raw.get("parent") if isinstance(raw.get("parent"), dict) else {}
    if spec.control and not (parent.get("pretrain") and raw.get("train")):
        problems.append((
            "sweep.control",
            "needs a parent.pretrain section (the parent's shape and pretraining tokens) and a train section",
        ))  # fmt: skip
    if spec.control and parent.get("model"):
        problems.append(("sweep.control", "needs the sweep to place its parents: leave parent.model out"))
    return seeds, problems


def _cell_raw(
    raw: dict[str, Any],
    spec: SweepSpec,
    point: tuple[str, float, int | None, int],
    output: Path,
    replicated: bool,
) -> dict:
    method, ratio, budget, seed = point
    cell = copy.deepcopy(raw)
    cell["seed"] = seed
    parent = cell.get("parent")
    if isinstance(parent, dict) and parent.get("pretrain") and not parent.get("model"):
        # One pretrained parent per seed for every cell: the first cell's pretrain stage makes it, the
        # others find it; each seed replicate pretrains its own (its init and data order are the seed's).
        parent["model"] = str(output / "models" / f"parent{seed_suffix(seed, replicated, '-seed')}")
    base_prune = cell.get("prune") if isinstance(cell.get("prune"), dict) else {}
    options = spec.options.get(method, base_prune.get("options") or {})
    cell["prune"] = {"method": method, "ratio": ratio, "options": options}
    if budget is not None:
        cell["train"]["token_budget"] = budget
    push = cell.get("push")
    if isinstance(push, dict) and push.get("repo_prefix"):
        ident = cell_id(method, ratio, budget, seed if replicated else None)
        push["repo_prefix"] = f"{push['repo_prefix']}-{ident}"
    return cell
