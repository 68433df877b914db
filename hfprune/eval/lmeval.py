"""lm-evaluation-harness on the in-memory models of a run: presets, the headline average, the protocol.

Called by the pipeline's eval stages beside perplexity, for every model (parent, pruned, continued,
scratch), whenever the recipe names an `eval.preset` or `eval.lm_eval.tasks`. The model goes to
lm-eval as it is in memory (`HFLM(pretrained=model, tokenizer=tok)`), never saved again. Tasks are
looked up in the packaged `tasks/` folder and the recipe's `include_path` first, so local tasks
never pay for indexing lm-eval's thousands of YAMLs; lm-eval's own tasks read their data through
`datasets` as usual (from the cache when offline).

Results are keyed `<task>@<shots>` (the study runs some tasks at two shot counts), each with the
metric the suite reports for it, and the headline average is computed in exactly one place,
`headline_average`, and stored with the list of entries it averaged.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from hfprune.errors import RunFailure


logger = logging.getLogger(__name__)

PACKAGED_TASKS = Path(__file__).parent / "tasks"
# Lower is better for these; they are reported but never averaged with accuracies.
LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"})
AVERAGE_DEFINITION = "unweighted mean of each listed entry's reported metric (a fraction), one entry = one task at one shot count"


class LmEvalError(RunFailure, ValueError):
    """An lm-eval setup that cannot run (unknown task, missing metric, missing include_path)."""


@dataclass(frozen=True)
class TaskEntry:
    task: str
    num_fewshot: int
    metric: str
    in_average: bool

    @property
    def key(self) -> str:
        return f"{self.task}@{self.num_fewshot}"


def _suite(*rows: tuple[str, int, str, bool]) -> tuple[TaskEntry, ...]:
    return tuple(TaskEntry(*row) for row in rows)


# The study's accuracy suite (research/paper.md §5.2): task, shots, the metric it reports. Which subset
# the study averages is not known, so the headline average is the zero-shot commonsense suite that
# the pruning literature reports (Wanda, SparseGPT, LLM-Pruner): BoolQ, RTE, HellaSwag, WinoGrande,
# ARC-e, ARC-c, OpenBookQA. OpenBookQA's harness default reports acc and acc_norm; acc_norm is taken,
# as for the other tasks whose answers differ in length.
PAPER_SUITE = _suite(
    ("boolq", 0, "acc", True),
    ("rte", 0, "acc", True),
    ("hellaswag", 0, "acc_norm", True),
    ("winogrande", 0, "acc", True),
    ("arc_easy", 0, "acc_norm", True),
    ("arc_challenge", 0, "acc_norm", True),
    ("openbookqa", 0, "acc_norm", True),
    ("winogrande", 5, "acc", False),
    ("arc_challenge", 25, "acc_norm", False),
    ("hellaswag", 10, "acc_norm", False),
    ("truthfulqa_mc1", 0, "acc", False),
    ("truthfulqa_mc2", 0, "acc", False),
    ("piqa", 0, "acc_norm", False),
    ("sciq", 0, "acc", False),
    ("anli_r1", 0, "acc", False),
    ("anli_r2", 0, "acc", False),
    ("anli_r3", 0, "acc", False),
    ("mmlu", 0, "acc", False),
    ("mmlu", 5, "acc", False),
    ("record", 0, "f1", False),
)
# CI-sized and offline: the packaged tasks in tasks/ (24 questions, the held-out pydoc topics).
QUICK_SUITE = _suite(("hfprune_mc", 0, "acc", True), ("hfprune_text", 0, "bits_per_byte", False))
PRESETS = {"paper": PAPER_SUITE, "quick": QUICK_SUITE}


def resolve_tasks(spec: Any) -> tuple[TaskEntry, ...]:
    """The entries an `eval` section asks for: its preset's suite, then `lm_eval.tasks`."""
    entries = list(PRESETS[spec.preset]) if spec.preset else []
    for task in spec.lm_eval.tasks:
        shots = spec.lm_eval.num_fewshot if task.num_fewshot is None else task.num_fewshot
        averaged = task.metric not in LOWER_IS_BETTER if task.in_average is None else task.in_average
        entries.append(TaskEntry(task.task, shots, task.metric, averaged))
    keys = [entry.key for entry in entries]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(
            f"lm-eval task(s) {', '.join(twice)} given twice (the preset may already include them)"
        )
    return tuple(entries)


def headline_average(results: dict[str, dict[str, Any]], entries: tuple[TaskEntry, ...]) -> dict | None:
    """The single headline number: see AVERAGE_DEFINITION. None when no entry is averaged."""
    keys = [entry.key for entry in entries if entry.in_average]
    if not keys:
        return None
    value = sum(results[key]["value"] for key in keys) / len(keys)
    return {"value": value, "of": keys, "definition": AVERAGE_DEFINITION}


def harness_version() -> str:
    from importlib.metadata import version

    return f"lm-eval {version('lm-eval')}"


def evaluate_lm(model: Any, tokenizer: Any, spec: Any) -> dict[str, Any] | None:
    """Run the lm-eval entries of an `eval` section on `model`; None when it names none."""
    entries = resolve_tasks(spec)
    if not entries:
        return None
    from lm_eval.models.huggingface import HFLM

    settings = spec.lm_eval
    batch_size = settings.batch_size or spec.batch_size
    manager = task_manager(settings.include_path, [entry.task for entry in entries])
    with _model_state_kept(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results, versions = _run_entries(lm, entries, settings, manager)
    protocol = {
        "harness": harness_version(),
        "preset": spec.preset,
        "tasks": [entry.key for entry in entries],
        "limit": settings.limit,
        "batch_size": batch_size,
        "seeds": dict.fromkeys(("random", "numpy", "torch", "fewshot"), settings.seed),
        "include_path": list(settings.include_path),
        "max_length": lm.max_length,
        "task_versions": {task: versions[task] for task in sorted(versions)},
    }
    return {"results": results, "average": headline_average(results, entries), "protocol": protocol}


def _run_entries(
    lm: Any, entries: tuple[TaskEntry, ...], settings: Any, manager: Any
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Results keyed `<task>@<shots>`, and lm-eval's task versions; one harness call per shot count,
    since num_fewshot is a per-call setting in lm-eval."""
    import lm_eval

    results: dict[str, dict[str, Any]] = {}
    versions: dict[str, Any] = {}
    by_shots = groupby(sorted(entries, key=lambda e: e.num_fewshot), key=lambda e: e.num_fewshot)
    for shots, group in ((shots, list(group)) for shots, group in by_shots):
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(dict.fromkeys(entry.task for entry in group)),
            num_fewshot=shots,
            limit=settings.limit,
            task_manager=manager,
            log_samples=False,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
        versions.update(output.get("versions", {}))
        for entry in group:
            results[entry.key] = _entry_result(output, entry)
            logger.info("lm-eval %s %s: %.4f", entry.key, entry.metric, results[entry.key]["value"])
    return results, versions


def task_manager(include_path: list[str], names: list[str]) -> Any:
    """A TaskManager that knows `names`: local folders only when they suffice (indexing all of lm-eval's
    tasks takes tens of seconds), else lm-eval's own tasks too."""
    from lm_eval.tasks import TaskManager

    missing_dirs = [path for path in include_path if not Path(path).is_dir()]
    if missing_dirs:
        raise LmEvalError(f"eval.lm_eval.include_path: {', '.join(missing_dirs)} is not a folder")
    paths = [str(PACKAGED_TASKS), *include_path]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(name in local.all_tasks for name in names):
        return local
    full = TaskManager(include_path=paths)
    unknown = [name for name in names if name not in full.all_tasks]
    if unknown:
        hints = [
            f"{n!r} (did you mean {m[0]!r}?)" if (m := _close(n, full.all_tasks)) else repr(n)
            for n in unknown
        ]
        raise LmEvalError(f"eval.lm_eval.tasks: unknown lm-eval task {', '.join(hints)}")
    return full


def _close(name: str, known: list[str]) -> list[str]:
    return difflib.get_close_matches(name, known, n=1)


def _entry_result(output: dict[str, Any], entry: TaskEntry) -> dict[str, Any]:
    """The reported metric of one entry, with every other metric the task gave."""
    scores = output["results"].get(entry.task, {})
    values = {
        key.split(",")[0]: value
        for key, value in scores.items()
        if "," in key and "_stderr" not in key and isinstance(value, int | float)
    }
    if entry.metric not in values:
        raise LmEvalError(
            f"lm-eval task {entry.task!r} reported no {entry.metric!r} metric; it reported: "
            f"{', '.join(sorted(values)) or 'nothing'} (set `metric` for this task)"
        )
    stderr = next((v for k, v in scores.items() if k.startswith(f"{entry.metric}_stderr,")), None)
    samples = output.get("n-samples", {}).get(entry.task, {})
    return {
        **asdict(entry),
        "num_fewshot": output.get("n-shot", {}).get(entry.task, entry.num_fewshot),
        "value": float(values[entry.metric]),
        "stderr": stderr if isinstance(stderr, int | float) else None,
        "higher_is_better": entry.metric not in LOWER_IS_BETTER,
        "samples": samples.get("effective"),
        "metrics": values,
    }


@contextlib.contextmanager
def _model_state_kept(model: Any) -> Iterator[None]:
    """lm-eval seeds the global RNGs and switches the model to eval mode; undo both afterwards, so
    evaluating a model never changes what a later stage (training) draws."""
    import numpy as np
    import torch

    was_training = model.training
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.train(was_training)
