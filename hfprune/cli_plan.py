"""Command-line pieces of the plan and the held-out check: the machine a plan is made for, and warnings.

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
