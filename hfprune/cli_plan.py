"""Command-line pieces around the checks and the plan: the machine a plan is made for, `validate`'s
report of one recipe (with its held-out warnings), and the metrics table a run ends with.

Used by `hfprune.cli`: `run`, `prune` and `sweep` take `--hardware`, `--device-memory` and `--host-memory`
(or HFPRUNE_HARDWARE, HFPRUNE_DEVICE_MEMORY, HFPRUNE_HOST_MEMORY) and hand the machine to
`hfprune.preflight`, which plans every stage for it; `validate` prints the held-out warnings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from hfprune.hardware import parse_size

    try:
        return None if value is None else parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def hardware_options(command: Any) -> Any:
    """The machine the plan is made for: this one unless stated (also by HFPRUNE_* variables)."""
    options = [
        click.option(
            "--hardware",
            envvar="HFPRUNE_HARDWARE",
            type=click.Choice(["detect", "h100-80gb", "a100-80gb", "h200"]),
            default="detect",
            show_default=True,
            help="Plan for this machine (detect) or a reference one. Env: HFPRUNE_HARDWARE.",
        ),
        click.option(
            "--device-memory",
            envvar="HFPRUNE_DEVICE_MEMORY",
            callback=_size,
            metavar="SIZE",
            help="Memory of one accelerator for the plan, e.g. 80GiB or 80GB. Env: HFPRUNE_DEVICE_MEMORY.",
        ),
        click.option(
            "--host-memory",
            envvar="HFPRUNE_HOST_MEMORY",
            callback=_size,
            metavar="SIZE",
            help="Host memory the run may use, e.g. 64GiB. Env: HFPRUNE_HOST_MEMORY.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def plan_hardware(hardware: str, device_memory: int | None, host_memory: int | None) -> Any:
    """The `Hardware` the options of `hardware_options` state (this machine where they state nothing)."""
    from hfprune.hardware import stated_hardware

    return stated_hardware(hardware, device_memory=device_memory, host_memory=host_memory)


def print_warnings(path: Path, warnings: list[tuple[str, str]]) -> None:
    """One line per held-out problem, under the recipe's `ok` line (stderr: programs read stdout)."""
    for key, message in warnings:
        click.echo(f"warning  {path}: {key}: {message}", err=True)


def validate_one(path: Path, parent: bool | None, files: bool) -> int:
    """Validate one recipe or sweep (schema, then `hfprune.preflight`); print ok or its problems."""
    from hfprune.errors import HfpruneError
    from hfprune.grid import load_sweep
    from hfprune.preflight import preflight, preflight_cells
    from hfprune.recipe import load_recipe, read_recipe_yaml

    try:
        if "sweep" in read_recipe_yaml(path):
            cells = load_sweep(path).cells
            check_parent = parent if parent is not None else local_parent(cells[0].recipe)
            checked = preflight_cells(cells, source=str(path), parent=check_parent, files=files, log=False)
            note = f"sweep of {len(cells)} cells"
        else:
            recipe = load_recipe(path)
            check_parent = parent if parent is not None else local_parent(recipe)
            checked = preflight(recipe, source=str(path), parent=check_parent, files=files, log=False)
            note = ""
    except HfpruneError as err:
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    if not check_parent:
        note = ", ".join(filter(None, [note, "parent config not checked: --parent fetches it"]))
    click.echo(f"ok       {path}" + (f" ({note})" if note else ""))
    print_warnings(path, checked.warnings)  # held-out problems warn: the recipe is still valid
    return 0


def local_parent(recipe: Any) -> bool:
    """Whether the parent's config is at hand without the network (a local folder, GGUF included, or a
    parent hfprune pretrains, whose config the recipe gives unless its tokenizer comes from the Hub)."""
    pretrain = recipe.parent.pretrain
    if pretrain is not None and (pretrain.tokenizer.from_ is None or Path(pretrain.tokenizer.from_).is_dir()):
        return True
    return Path(recipe.parent.model).expanduser().is_dir()


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of perplexities: one row per evaluation set, one column per model."""
    from hfprune import kinds

    models = [m for m in kinds.names() if m in metrics]
    sets = sorted({name for m in models for name in metrics[m].get("perplexity", {})})
    if not sets:
        return "(no evaluation results yet)"
    header = ["perplexity", *models, "params (parent -> pruned)"]
    rows = [header]
    params = " -> ".join(
        f"{metrics[m]['params']['total'] / 1e6:.1f}M" for m in models if "params" in metrics[m]
    )
    for name in sets:
        values = [metrics[m].get("perplexity", {}).get(name, {}).get("value") for m in models]
        rows.append([name, *("-" if v is None else f"{v:.2f}" for v in values), params])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)
