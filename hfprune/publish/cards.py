"""Model cards, rendered from the Jinja templates in `model_cards/` via `huggingface_hub.ModelCard`.

Runs after evaluation, once per model folder of a run (every kind of `hfprune.kinds` with a card
template; the parent is not ours to describe). A card's template is its kind's file (what the model is)
followed by `_sections.md` (how it was made: pruning, then training; size; the results table with every
model of the run side by side; related models; how to load it; the command and resolved recipe that
reproduce it), so the prose lives in the templates and this module only gathers data. Front matter goes through
`ModelCardData`: `base_model` only for kinds made from the parent's weights (never for the
random-init twin), the kind's tags, the parent's license, Hub datasets, and `model-index` with this
model's scores so the Hub renders them, each perplexity set's `split` naming its role (held out or not:
`hfprune.checks.heldout`). The results table is `hfprune.publish.results`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from hfprune import kinds
from hfprune.callbacks.token_budget import PAPER_TRAINING_DEFAULTS
from hfprune.checks.heldout import overlapping_sets
from hfprune.errors import RunFailure
from hfprune.hub import published_kinds, repo_id_for
from hfprune.outputs import write_text
from hfprune.pipeline.workspace import Workspace
from hfprune.publish.provenance import (
    HUB_URL,
    dataset_reference,
    parent_context,
    parent_reference,
    shareable_command,
    shareable_recipe,
)
from hfprune.publish.results import eval_results, is_hub_dataset, results_context
from hfprune.recipe.schema import Recipe
from hfprune.seeds import Role, role_seed


RECIPE_FILE = "recipe.yaml"


class CardError(RunFailure, ValueError):
    """Cards cannot be written: the output folder holds no pruned model yet."""


FIGURES_NOTE = (
    "This model is one cell of an `hfprune sweep` over pruning methods, ratios and token budgets. The plots "
    "compare every cell's continued model with its random-init twin on held-out perplexity (lower is "
    "better): learning curves against tokens trained, and the continued-minus-scratch gap against the "
    "pruning ratio and the budget."
)


def template_path(name: str) -> Path:
    return Path(str(resources.files("hfprune.model_cards") / f"{name}.md"))


def template_text(kind: str) -> str:
    """The kind's own template (what the model is) followed by the sections every card shares."""
    name = kinds.get(kind).card_template
    if name is None:
        raise CardError(f"model kind {kind!r} has no card (kinds with cards: {_card_kind_names()})")
    return template_path(name).read_text() + template_path("_sections").read_text()


def _card_kind_names() -> str:
    return ", ".join(kind.name for kind in kinds.carded())


def card_repo_id(recipe: Recipe, kind: str) -> str:
    """Where `kind` is (or would be) published; a placeholder org when the recipe sets no repo_prefix."""
    return repo_id_for(recipe.push.repo_prefix or f"<org>/{recipe.name}", kind)


def render_card(
    kind: str,
    recipe: Recipe,
    report: dict[str, Any],
    metrics: dict[str, Any],
    license: str | None,
    command: str,
    training: dict[str, Any] | None = None,
    figures: list[str] | None = None,
) -> ModelCard:
    """The card of `models/<kind>/`; `training` is its training_report.json (continued, scratch);
    `figures` are PNGs in the model folder (a sweep's report plots), shown in their own section."""
    repo_id = card_repo_id(recipe, kind)
    return ModelCard.from_template(
        card_data(kind, recipe, report, metrics.get(kind, {}), license),
        template_str=template_text(kind),
        kind=kind,
        model_name=repo_id.split("/")[-1],
        parent=parent_context(recipe),
        recovery=_recovery_context(kind, recipe),
        data=_data_context(recipe, report),
        **_pruning_context(report),
        **results_context(metrics, kind, overlapping_sets(recipe)),
        training=training,
        train=recipe.train.model_dump(mode="json") if recipe.train else None,
        optim={**PAPER_TRAINING_DEFAULTS, **recipe.train.args} if recipe.train else None,
        seed=recipe.seed,
        twin_seed=role_seed(recipe.seed, Role.TWIN_INIT),  # what a random-init twin was initialised from
        setting=kinds.get(kind).setting,  # the study setting a trained kind's numbers belong to
        pretrained_tokens=recipe.parent.pretrained_tokens,
        siblings=_siblings(recipe, kind, metrics),
        repo_id=repo_id,
        command=shareable_command(command),
        recipe_yaml=shareable_recipe(recipe),
        figures=figures or [],
        figures_note=FIGURES_NOTE,
    )


def render_pruned_card(
    recipe: Recipe, report: dict[str, Any], metrics: dict[str, Any], license: str | None, command: str
) -> ModelCard:
    """The card of `models/pruned/`."""
    return render_card(kinds.PRUNED.name, recipe, report, metrics, license, command)


def write_cards(
    out_dir: Path,
    recipe: Recipe,
    metrics: dict[str, Any],
    license: str | None,
    command: str,
    figures: list[str] | None = None,
) -> list[Path]:
    """(Re-)render README.md in every model folder of a run that exists; returns the cards written.

    `figures` name PNGs already copied into each model folder (see `hfprune.sweep.runner`)."""
    ws = Workspace(out_dir)
    report_path = ws.pruned_dir / "prune_report.json"
    if not report_path.is_file():
        raise CardError(f"{report_path} does not exist: run the recipe (at least `hfprune prune`) first")
    report = json.loads(report_path.read_text())
    written = []
    for kind in ws.saved_kinds(carded=True):
        folder = ws.model_dir(kind)
        training_file = folder / "training_report.json"
        training = json.loads(training_file.read_text()) if training_file.is_file() else None
        card = render_card(kind, recipe, report, metrics, license, command, training, figures)
        write_text(folder / "README.md", str(card))
        write_text(folder / RECIPE_FILE, shareable_recipe(recipe))  # what the card says to rerun
        written.append(folder / "README.md")
    return written


def recorded_license(folder: Path) -> str | None:
    """The license in a card already written into `folder`, so re-rendering needs no network."""
    if not (folder / "README.md").is_file():
        return None  # ModelCard.load would take the missing path for a Hub repo id
    try:
        return ModelCard.load(folder / "README.md").data.to_dict().get("license")
    except (OSError, ValueError):
        return None


def card_data(
    kind: str, recipe: Recipe, report: dict[str, Any], scores: dict[str, Any], license: str | None
) -> ModelCardData:
    """Front matter. Only kinds made from the parent's weights name it as base_model (the random-init
    twin has the parent's shape but not its weights); calibration data shaped those weights too."""
    _, parent_id = parent_reference(recipe)
    method, granularity = report["method"], report["granularity"]
    spec = kinds.get(kind)
    sources = [recipe.calibration.dataset] if spec.has_base_model and report["calibration"] else []
    if spec.trained and recipe.train:
        sources.append(recipe.train.dataset)
    return ModelCardData(
        base_model=parent_id if spec.has_base_model else None,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=["hfprune", method, f"{granularity}-pruning", *spec.tags],
        datasets=list(dict.fromkeys(s.path for s in sources if is_hub_dataset(s.path))) or None,
        model_name=card_repo_id(recipe, kind).split("/")[-1],
        eval_results=eval_results(scores, overlapping_sets(recipe)) or None,
    )


def _siblings(recipe: Recipe, kind: str, metrics: dict[str, Any]) -> list[dict[str, str]]:
    """The other models of this run that are published beside this one."""
    if not recipe.push.repo_prefix:
        return []
    measured = [kind.name for kind in kinds.carded() if kind.name in metrics]
    return [
        {
            "kind": other,
            "repo_id": (rid := repo_id_for(recipe.push.repo_prefix, other)),
            "link": f"{HUB_URL}/{rid}",
        }
        for other in published_kinds(recipe.push.include_pruned, measured)
        if other != kind
    ]


def _pruning_context(report: dict[str, Any]) -> dict[str, Any]:
    shape = report["shape"]
    sparse = report["granularity"] == "sparse"
    # One parameter count everywhere: what the checkpoint stores (a sparse model stores the parent's
    # shapes); for sparse models the non-zero count goes beside it.
    stored = shape["params_before"] if sparse else shape["params_after"]
    return {
        "method": report["method"],
        "method_description": report["description"],
        "granularity": report["granularity"],
        "ratio_requested": shape["ratio_requested"],
        "ratio_achieved": shape["ratio_achieved"],
        "params_parent": shape["params_before"],
        "params_model": stored,
        "params_nonzero": shape["params_after"] if sparse else None,
        "shape_rows": [
            (k, report["parent_config"].get(k, "-"), v) for k, v in shape["config_changes"].items()
        ],
        "kept_layers": report.get("kept_layers"),
        "calibration": report["calibration"],
        "seconds": report["seconds"],
    }


def _recovery_context(kind: str, recipe: Recipe) -> dict[str, Any] | None:
    """How a recovery kind trained (`hfprune.kinds.Recovery`): its recipe settings, for the card."""
    recovery = kinds.get(kind).recovery
    if recovery is None or recipe.train is None:
        return None
    settings = getattr(recipe.train, str(recovery))
    return {"kind": str(recovery), **(settings.model_dump(mode="json") if settings else {})}


def _data_context(recipe: Recipe, report: dict[str, Any]) -> dict[str, str | None]:
    """The calibration and training data in words (Hub ids with links, local files by name)."""
    calibration = report.get("calibration")
    return {
        "calibration": dataset_reference(calibration["dataset"]) if calibration else None,
        "train": dataset_reference(recipe.train.dataset.model_dump(mode="json")) if recipe.train else None,
    }
