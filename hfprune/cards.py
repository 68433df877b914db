"""Model cards, rendered from the Jinja templates in `model_cards/` via `huggingface_hub.ModelCard`.

Runs after evaluation, once per model folder of a run (`pruned`, `continued`, `scratch`; the parent is
not ours to describe). A card's template is its kind's file (what the model is) followed by
`_sections.md` (how it was made: pruning, then training; size; the results table with every model of
the run side by side; related models; how to load it; the command and resolved recipe that reproduce
it), so the prose lives in the templates and this module only gathers data. Front matter goes through
`ModelCardData`: `base_model` only for models made from the parent's weights (never for the
random-init twin), tags, the parent's license, Hub datasets, and `model-index` with this model's
scores so the Hub renders them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hfprune.errors import RunFailure
from hfprune.callbacks import PAPER_TRAINING_DEFAULTS
from hfprune.hub import published_kinds, repo_id_for
from hfprune.outputs import write_text
from hfprune.recipe import Recipe


CARD_KINDS = ("pruned", "continued", "scratch")
MODEL_COLUMNS = ("parent", *CARD_KINDS)
HUB_URL = "https://huggingface.co"
# `datasets.load_dataset` builders for local files: not Hub datasets, so never listed in `datasets:`.
LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas", "webdataset", "imagefolder"}


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
    return template_path(kind).read_text() + template_path("_sections").read_text()


def parent_reference(recipe: Recipe) -> tuple[str, str | None]:
    """(display name, Hub id or None) of the parent; a local directory has no Hub id unless `hub_id` says."""
    parent = recipe.parent
    if parent.hub_id:
        return parent.hub_id, parent.hub_id
    local = Path(parent.model).expanduser().exists() or parent.model.startswith((".", "/", "~"))
    return (Path(parent.model).name or parent.model, None) if local else (parent.model, parent.model)


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
    parent_name, parent_id = parent_reference(recipe)
    repo_id = card_repo_id(recipe, kind)
    return ModelCard.from_template(
        card_data(kind, recipe, report, metrics.get(kind, {}), license, repo_id),
        template_str=template_text(kind),
        kind=kind,
        model_name=repo_id.split("/")[-1],
        parent={"name": parent_name, "link": f"{HUB_URL}/{parent_id}" if parent_id else recipe.parent.model},
        **_pruning_context(report),
        **_results_context(metrics, kind),
        training=training,
        train=recipe.train.model_dump(mode="json") if recipe.train else None,
        optim={**PAPER_TRAINING_DEFAULTS, **recipe.train.args} if recipe.train else None,
        seed=recipe.seed,
        siblings=_siblings(recipe, kind, metrics),
        repo_id=repo_id,
        command=command,
        recipe_yaml=recipe.to_yaml(),
        figures=figures or [],
        figures_note=FIGURES_NOTE,
    )


def render_pruned_card(
    recipe: Recipe, report: dict[str, Any], metrics: dict[str, Any], license: str | None, command: str
) -> ModelCard:
    """The card of `models/pruned/`."""
    return render_card("pruned", recipe, report, metrics, license, command)


def write_cards(
    out_dir: Path,
    recipe: Recipe,
    metrics: dict[str, Any],
    license: str | None,
    command: str,
    figures: list[str] | None = None,
) -> list[Path]:
    """(Re-)render README.md in every model folder of a run that exists; returns the cards written.

    `figures` name PNGs already copied into each model folder (see `hfprune.sweep`)."""
    report_path = out_dir / "models" / "pruned" / "prune_report.json"
    if not report_path.is_file():
        raise CardError(f"{report_path} does not exist: run the recipe (at least `hfprune prune`) first")
    report = json.loads(report_path.read_text())
    written = []
    for kind in CARD_KINDS:
        folder = out_dir / "models" / kind
        if not (folder / "config.json").is_file():
            continue
        training_file = folder / "training_report.json"
        training = json.loads(training_file.read_text()) if training_file.is_file() else None
        card = render_card(kind, recipe, report, metrics, license, command, training, figures)
        write_text(folder / "README.md", str(card))
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
    kind: str,
    recipe: Recipe,
    report: dict[str, Any],
    scores: dict[str, Any],
    license: str | None,
    repo_id: str,
) -> ModelCardData:
    """Front matter. The random-init twin has the parent's shape but not its weights: no base_model."""
    _, parent_id = parent_reference(recipe)
    method, granularity = report["method"], report["granularity"]
    extra = {
        "pruned": ["pruned"],
        "continued": ["pruned", "continued-pretraining"],
        "scratch": ["random-init"],
    }
    sources = [recipe.calibration.dataset] if kind != "scratch" and report["calibration"] else []
    if kind != "pruned" and recipe.train:
        sources.append(recipe.train.dataset)
    return ModelCardData(
        base_model=None if kind == "scratch" else parent_id,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=["hfprune", method, f"{granularity}-pruning", *extra[kind]],
        datasets=list(dict.fromkeys(s.path for s in sources if _is_hub_dataset(s.path))) or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(scores) or None,
    )


def eval_results(scores: dict[str, Any]) -> list[EvalResult]:
    """This model's scores as `model-index` entries: perplexity sets, then lm-eval entries."""
    results = []
    for name, entry in scores.get("perplexity", {}).items():
        protocol = entry["protocol"]
        dataset = protocol.get("dataset", {}).get("path", name)
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset if _is_hub_dataset(dataset) else name,
                dataset_name=name,
                dataset_split=protocol.get("dataset", {}).get("split"),
                metric_type="perplexity",
                metric_name=f"perplexity ({protocol['windows']} x {protocol['seq_len']} tokens)",
                metric_value=round(entry["value"], 4),
            )
        )
    for key, entry in (scores.get("lm_eval") or {}).get("results", {}).items():
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=entry["task"],
                dataset_name=key,
                dataset_args={"num_few_shot": entry["num_fewshot"]},
                metric_type=entry["metric"],
                metric_name=f"{entry['metric']} ({entry['num_fewshot']}-shot)",
                metric_value=round(entry["value"], 4),
            )
        )
    return results


def result_rows(metrics: dict[str, Any], models: list[str]) -> list[dict[str, Any]]:
    """Rows of the side-by-side results table: (metric, protocol, one value per model in `models`)."""
    specs = [("parameters", "", ("params", "total"), "{:,}")]
    if any("tokens_trained" in metrics.get(model, {}) for model in models):
        specs.append(("tokens trained", "", ("tokens_trained",), "{:,}"))
    for name, entry in _merged(metrics, models, "perplexity").items():
        protocol = f"{entry['protocol']['windows']} x {entry['protocol']['seq_len']} tokens"
        specs.append((f"perplexity ({name})", protocol, ("perplexity", name, "value"), "{:.2f}"))
    for key, entry in _merged(metrics, models, "lm_eval", "results").items():
        protocol = f"{entry['num_fewshot']}-shot, {entry['metric']}"
        specs.append((entry["task"], protocol, ("lm_eval", "results", key, "value"), "{:.4f}"))
    if average := _first(metrics, models, "lm_eval", "average"):
        specs.append(
            ("**average**", f"mean of {len(average['of'])}", ("lm_eval", "average", "value"), "**{:.4f}**")
        )
    return [
        {
            "metric": metric,
            "protocol": protocol,
            "values": [_format(_get(metrics, m, *path), fmt) for m in models],
        }
        for metric, protocol, path, fmt in specs
    ]


def _results_context(metrics: dict[str, Any], kind: str) -> dict[str, Any]:
    models = [model for model in MODEL_COLUMNS if model in metrics]
    protocol, average = (
        _first(metrics, models, "lm_eval", "protocol"),
        _first(metrics, models, "lm_eval", "average"),
    )
    if protocol:
        limit = f"at most {protocol['limit']} documents per task" if protocol["limit"] else "every document"
        protocol = (
            f"{protocol['harness']} on the in-memory model ({limit}, seed {protocol['seeds']['fewshot']})"
        )
    return {
        "columns": [f"**{m}** (this model)" if m == kind else m for m in models],
        "rows": result_rows(metrics, models),
        "lm_eval_protocol": protocol,
        "average_definition": f"{average['definition']}: {', '.join(average['of'])}" if average else None,
    }


def _get(metrics: dict[str, Any], model: str, *path: str) -> Any:
    node: Any = metrics.get(model, {})
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _first(metrics: dict[str, Any], models: list[str], *path: str) -> Any:
    """The first model's value at `path` (lm-eval protocols and average definitions agree across a run)."""
    return next((value for m in models if (value := _get(metrics, m, *path))), None)


def _merged(metrics: dict[str, Any], models: list[str], *path: str) -> dict[str, Any]:
    """The union of the dicts at `path` over models, in order of first appearance."""
    merged: dict[str, Any] = {}
    for model in models:
        for key, value in (_get(metrics, model, *path) or {}).items():
            merged.setdefault(key, value)
    return merged


def _format(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _siblings(recipe: Recipe, kind: str, metrics: dict[str, Any]) -> list[dict[str, str]]:
    """The other models of this run that are published beside this one."""
    if not recipe.push.repo_prefix:
        return []
    kinds = published_kinds(recipe.push.include_pruned, [k for k in CARD_KINDS if k in metrics])
    return [
        {
            "kind": other,
            "repo_id": (rid := repo_id_for(recipe.push.repo_prefix, other)),
            "link": f"{HUB_URL}/{rid}",
        }
        for other in kinds
        if other != kind
    ]


def _is_hub_dataset(path: str) -> bool:
    return not (path in LOCAL_BUILDERS or path.startswith(("hfprune:", ".", "/", "~")) or Path(path).exists())


def _pruning_context(report: dict[str, Any]) -> dict[str, Any]:
    shape = report["shape"]
    return {
        "method": report["method"],
        "method_description": report["description"],
        "granularity": report["granularity"],
        "ratio_requested": shape["ratio_requested"],
        "ratio_achieved": shape["ratio_achieved"],
        "params_parent": shape["params_before"],
        "params_model": shape["params_after"],
        "shape_rows": [
            (k, report["parent_config"].get(k, "-"), v) for k, v in shape["config_changes"].items()
        ],
        "kept_layers": report.get("kept_layers"),
        "calibration": report["calibration"],
        "seconds": report["seconds"],
    }
