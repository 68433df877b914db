"""Sweep recipes: a recipe's `sweep:` section expanded into a grid of ordinary recipes, one per cell.

The first step of `hfprune sweep`. `load_sweep` reads a recipe with a `sweep:` section (lists of
`method`, `ratio` and `token_budget`, each replacing the base recipe's key of the same name, plus
`options` per method), validates every cell as a complete recipe (problems of all cells at once, each
naming the cells it concerns) and gives each cell its own output folder under the sweep's.
`Sweep.select` picks cells for `--only method=wanda,ratio=0.5`. Running the grid is `hfprune.sweep.runner`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, replace
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

    @field_validator("method", "ratio", "token_budget")
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

    @property
    def id(self) -> str:
        return cell_id(self.method, self.ratio, self.token_budget)

    def value(self, axis: str) -> Any:
        return getattr(self, axis)


def cell_id(method: str, ratio: float, token_budget: int | None) -> str:
    """The cell's folder name, e.g. `wanda-r0.5-t16384`."""
    budget = f"-t{token_budget}" if token_budget is not None else ""
    return f"{method}-r{ratio:g}{budget}"


@dataclass(frozen=True)
class Sweep:
    name: str
    source: str
    output_path: Path
    cells: list[Cell]

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
                raise SweepError(f"--only {text!r}: expected key=value pairs with keys method, ratio, budget")
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
    cells, cell_problems = [], {}
    for method in axes["method"]:
        for ratio in axes["ratio"]:
            for budget in axes["token_budget"]:
                ident = cell_id(method, ratio, budget)
                cell_raw = _cell_raw(raw, spec, method, ratio, budget, output)
                cell_raw["name"], cell_raw["output_dir"] = f"{name}-{ident}", str(output / ident)
                try:
                    cells.append(Cell(method, ratio, budget, validate_recipe(cell_raw, source)))
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
    return Sweep(name, source, output, cells)


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
    return axes, problems


def _cell_raw(
    raw: dict[str, Any], spec: SweepSpec, method: str, ratio: float, budget: int | None, output: Path
) -> dict:
    cell = copy.deepcopy(raw)
    parent = cell.get("parent")
    if isinstance(parent, dict) and parent.get("pretrain") and not parent.get("model"):
        # One pretrained parent for every cell: the first cell's pretrain stage makes it, the others find it.
        parent["model"] = str(output / "models" / "parent")
    base_prune = cell.get("prune") if isinstance(cell.get("prune"), dict) else {}
    options = spec.options.get(method, base_prune.get("options") or {})
    cell["prune"] = {"method": method, "ratio": ratio, "options": options}
    if budget is not None:
        cell["train"]["token_budget"] = budget
    push = cell.get("push")
    if isinstance(push, dict) and push.get("repo_prefix"):
        push["repo_prefix"] = f"{push['repo_prefix']}-{cell_id(method, ratio, budget)}"
    return cell
