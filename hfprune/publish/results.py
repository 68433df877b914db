"""The results part of a model card: every model of the run side by side, and `model-index` entries.

Used by `hfprune.publish.cards` when it renders a card: the table has one column per model kind measured
(registry order, `hfprune.kinds`), one row per score (parameters, tokens trained, each perplexity set,
each lm-eval task and their average), and the legend under it names every kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult

from hfprune import kinds


# `datasets.load_dataset` builders for local files: not Hub datasets, so never listed in `datasets:`.
LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas", "webdataset", "imagefolder"}


def is_hub_dataset(path: str) -> bool:
    return not (path in LOCAL_BUILDERS or path.startswith(("hfprune:", ".", "/", "~")) or Path(path).exists())


def split_of(protocol: dict[str, Any]) -> str:
    """The split a perplexity was measured on: recorded with it, else `DatasetSpec`'s default (train),
    which earlier results left out of their protocol."""
    return protocol.get("dataset", {}).get("split", "train")


def eval_results(scores: dict[str, Any]) -> list[EvalResult]:
    """This model's scores as `model-index` entries: perplexity sets, then lm-eval entries."""
    results = []
    for name, entry in scores.get("perplexity", {}).items():
        protocol = entry["protocol"]
        dataset = protocol.get("dataset", {}).get("path", name)
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset if is_hub_dataset(dataset) else name,
                dataset_name=name,
                dataset_split=split_of(protocol),
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
        protocol = f"{split_of(entry['protocol'])} split, {entry['protocol']['windows']} x {entry['protocol']['seq_len']} tokens"
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


def results_context(metrics: dict[str, Any], kind: str) -> dict[str, Any]:
    """The template's results section: one column per model kind measured (registry order)."""
    # Kinds with scores (a `hfprune prune` run has none: its card gets no empty table).
    models = [model for model in kinds.names() if _measured(metrics.get(model, {}))]
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
        "rows": result_rows(metrics, models) if models else [],
        "lm_eval_protocol": protocol,
        "average_definition": f"{average['definition']}: {', '.join(average['of'])}" if average else None,
        "legend": [{"name": k.name, "summary": k.summary} for k in kinds.all_kinds() if k.name in models],
    }


def _measured(entry: dict[str, Any]) -> bool:
    return bool(entry.get("perplexity") or entry.get("lm_eval") or "params" in entry)


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
