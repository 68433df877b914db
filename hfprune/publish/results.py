"""The results part of a model card: every model of the run side by side, and `model-index` entries.

Used by `hfprune.publish.cards` when it renders a card: the table has one column per model kind measured
(registry order, `hfprune.kinds`), one row per score (parameters, tokens trained, each perplexity set,
each lm-eval task and their average), and the legend under it names every kind.

A perplexity set's `split` names its role: the split of a Hub or built-in dataset as recorded (`test`,
`validation`), and for local files, whose split label is only the loader's default `train`, `test` when
the set is held out of calibration and training text (`hfprune.checks.heldout`), else `train`. Its
protocol says how many documents the windows cover out of how many (`coverage`).
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


def split_of(protocol: dict[str, Any], held_out: bool = True) -> str:
    """The role of the text a perplexity was measured on (see the module docstring); a result recorded
    without its split read `DatasetSpec`'s default, `train`. `held_out`: whether the set is held out of
    calibration and training (`overlapping_sets`), which decides for local files."""
    dataset = protocol.get("dataset", {})
    split = dataset.get("split", "train")
    if split == "train" and (dataset.get("data_files") or dataset.get("path") in LOCAL_BUILDERS):
        return "test" if held_out else "train"  # the label is the loader's default: the role decides
    return split


def coverage(protocol: dict[str, Any]) -> str | None:
    """How the windows cover the set, in words (`hfprune.eval.perplexity`); None for results recorded
    before coverage was (their windows were the set's head)."""
    if protocol.get("documents_total") is None:
        return None
    spread = "spread over" if protocol.get("window_selection") == "spread" else "all of"
    limit = protocol.get("read_limit")
    read = f" (the first {limit:,} tokens of the stream)" if limit else ""
    return f"{spread} {protocol['documents_covered']:,} of {protocol['documents_total']:,} documents{read}"


def eval_results(scores: dict[str, Any], overlapping: frozenset[str] = frozenset()) -> list[EvalResult]:
    """This model's scores as `model-index` entries: perplexity sets (`overlapping`: the names of those
    not held out of calibration and training), then lm-eval entries."""
    results = []
    for name, entry in scores.get("perplexity", {}).items():
        protocol = entry["protocol"]
        dataset = protocol.get("dataset", {}).get("path", name)
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset if is_hub_dataset(dataset) else name,
                dataset_name=name,
                dataset_split=split_of(protocol, held_out=name not in overlapping),
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


def result_rows(
    metrics: dict[str, Any], models: list[str], overlapping: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Rows of the side-by-side results table: (metric, protocol, one value per model in `models`)."""
    specs = [("parameters", "", ("params", "total"), "{:,}")]
    if any("tokens_trained" in metrics.get(model, {}) for model in models):
        specs.append(("tokens trained", "", ("tokens_trained",), "{:,}"))
    for name, entry in _merged(metrics, models, "perplexity").items():
        recorded = entry["protocol"]
        split = split_of(recorded, held_out=name not in overlapping)
        protocol = f"{split} split, {recorded['windows']} x {recorded['seq_len']} tokens"
        if covered := coverage(recorded):
            protocol += f", {covered}"
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


def results_context(
    metrics: dict[str, Any], kind: str, overlapping: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The template's results section: one column per model kind measured (registry order);
    `overlapping` as for `eval_results`."""
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
        "rows": result_rows(metrics, models, overlapping) if models else [],
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
