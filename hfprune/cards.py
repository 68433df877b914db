"""Model cards, rendered from the Jinja templates in `hfprune/model_cards/` via `huggingface_hub.ModelCard`.

Runs after evaluation: the card states what the model is, how it was made (method, ratio requested
and achieved, parameters, calibration) and its scores next to the parent's, with the resolved recipe
and the command that reproduces it. Front matter goes through `ModelCardData`, so the Hub renders
`base_model`, tags and license as it expects.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from hfprune.recipe import Recipe


def template_path(name: str) -> Path:
    return Path(str(resources.files("hfprune") / "model_cards" / f"{name}.md"))


def parent_reference(recipe: Recipe) -> tuple[str, str | None]:
    """(display name, Hub id or None) of the parent; a local directory has no Hub id unless `hub_id` says."""
    parent = recipe.parent
    if parent.hub_id:
        return parent.hub_id, parent.hub_id
    local = Path(parent.model).expanduser().exists() or parent.model.startswith((".", "/", "~"))
    return (Path(parent.model).name or parent.model, None) if local else (parent.model, parent.model)


def perplexity_rows(metrics: dict[str, Any], models: list[str]) -> list[dict[str, str]]:
    """One row per perplexity set with each model's value, for the results table."""
    names: dict[str, str] = {}
    for model in models:
        for name, entry in metrics.get(model, {}).get("perplexity", {}).items():
            protocol = entry["protocol"]
            names.setdefault(name, f"{protocol['windows']} x {protocol['seq_len']} tokens")
    rows = []
    for name, protocol in names.items():
        row = {"metric": f"perplexity ({name})", "protocol": protocol}
        for model in models:
            value = metrics.get(model, {}).get("perplexity", {}).get(name, {}).get("value")
            row[model] = "-" if value is None else f"{value:.2f}"
        rows.append(row)
    return rows


def render_pruned_card(
    recipe: Recipe, report: dict[str, Any], metrics: dict[str, Any], license: str | None, command: str
) -> ModelCard:
    """The card of `models/pruned/`."""
    parent_name, parent_id = parent_reference(recipe)
    method = report["method"]
    card_data = ModelCardData(
        base_model=parent_id,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=["hfprune", "pruned", method, f"{report['granularity']}-pruning"],
    )
    shape = report["shape"]
    before, after = shape["params_before"], shape["params_after"]
    rows = [
        (key, report["parent_config"].get(key, "-"), value) for key, value in shape["config_changes"].items()
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path("pruned")),
        model_name=f"{recipe.name}-pruned",
        parent_name=parent_name,
        parent_link=f"https://huggingface.co/{parent_id}" if parent_id else recipe.parent.model,
        method=method,
        method_description=report["description"],
        granularity=report["granularity"],
        params_before=_Counts(before),
        params_after=_Counts(after),
        shape_rows=rows,
        ratio_requested=shape["ratio_requested"],
        ratio_achieved=shape["ratio_achieved"],
        kept_layers=report.get("kept_layers"),
        calibration=_describe_calibration(report["calibration"]),
        seconds=report["seconds"],
        results=perplexity_rows(metrics, ["parent", "pruned"]),
        repo_hint=f"<org>/{recipe.name}-pruned",
        command=command,
        recipe_yaml=recipe.to_yaml(),
    )


class _Counts:
    def __init__(self, counts: dict[str, int]):
        self.total = counts["total"]
        self.non_embedding = counts["non_embedding"]


def _describe_calibration(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return "none (the method needs no calibration data)"
    dataset = calibration["dataset"]
    files = f", files {dataset['data_files']}" if dataset.get("data_files") else ""
    return (
        f"{calibration['num_samples']} samples x {calibration['seq_len']} tokens from `{dataset['path']}` "
        f"(split {dataset['split']}{files})"
    )
