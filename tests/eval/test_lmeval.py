"""lm-evaluation-harness on in-memory models: presets, the headline average, task resolution, and the
pipeline evaluating every model of a run offline with the packaged quick tasks."""

from __future__ import annotations

import json
import random
import socket
import textwrap

import pytest
import torch
from conftest import tiny_model

from hfprune.eval.lmeval import (
    AVERAGE_DEFINITION,
    PAPER_SUITE,
    LmEvalError,
    TaskEntry,
    evaluate_lm,
    harness_version,
    headline_average,
    resolve_tasks,
    task_manager,
)
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.evaluation import EvalSpec
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import load_recipe


def keys(entries) -> dict[str, str]:
    return {entry.key: entry.metric for entry in entries}


def test_paper_preset_is_the_studys_suite():
    suite = keys(resolve_tasks(EvalSpec(preset="paper")))
    # research/paper.md §5.2: every task at each of its shot counts, with the metric it reports.
    assert suite == {
        "winogrande@0": "acc", "winogrande@5": "acc", "arc_easy@0": "acc_norm",
        "arc_challenge@0": "acc_norm", "arc_challenge@25": "acc_norm",
        "hellaswag@0": "acc_norm", "hellaswag@10": "acc_norm", "piqa@0": "acc_norm", "sciq@0": "acc",
        "truthfulqa_mc1@0": "acc", "truthfulqa_mc2@0": "acc", "boolq@0": "acc", "rte@0": "acc",
        "anli_r1@0": "acc", "anli_r2@0": "acc", "anli_r3@0": "acc", "openbookqa@0": "acc_norm",
        "mmlu@0": "acc", "mmlu@5": "acc", "record@0": "f1",
    }  # fmt: skip
    averaged = {entry.key for entry in PAPER_SUITE if entry.in_average}
    assert averaged == {f"{t}@0" for t in ("boolq", "rte", "hellaswag", "winogrande", "arc_easy")} | {
        "arc_challenge@0",
        "openbookqa@0",
    }


def test_recipe_tasks_add_to_the_preset():
    spec = EvalSpec(
        preset="quick",
        lm_eval={"tasks": ["piqa", {"task": "lambada_openai", "metric": "perplexity"}], "num_fewshot": 3},
    )
    entries = resolve_tasks(spec)
    assert [e.key for e in entries] == ["hfprune_mc@0", "hfprune_text@0", "piqa@3", "lambada_openai@3"]
    assert [e.in_average for e in entries] == [True, False, True, False]  # perplexities are never averaged


def test_a_task_given_twice_is_an_invalid_recipe(write_recipe):
    path = write_recipe("  preset: quick\n  lm_eval: {tasks: [hfprune_mc]}\nseed: 0\n")
    with pytest.raises(RecipeError, match=r"eval: lm-eval task\(s\) hfprune_mc@0 given twice"):
        load_recipe(path)


def test_headline_average_is_the_mean_of_the_averaged_entries_only():
    entries = (
        TaskEntry("a", 0, "acc", True),
        TaskEntry("b", 5, "acc_norm", True),
        TaskEntry("c", 0, "bits_per_byte", False),
    )
    results = {"a@0": {"value": 0.25}, "b@5": {"value": 0.75}, "c@0": {"value": 9.0}}
    assert headline_average(results, entries) == {
        "value": 0.5,
        "of": ["a@0", "b@5"],
        "definition": AVERAGE_DEFINITION,
    }
    assert headline_average(results, entries[2:]) is None


def test_unknown_task_names_a_close_match(monkeypatch):
    class FakeTaskManager:
        def __init__(self, include_path, include_defaults=True):
            self.all_tasks = ["hfprune_mc", *(["hellaswag", "arc_easy"] if include_defaults else [])]

    monkeypatch.setattr("lm_eval.tasks.TaskManager", FakeTaskManager)
    with pytest.raises(LmEvalError, match=r"unknown lm-eval task 'helaswag' \(did you mean 'hellaswag'\?\)"):
        task_manager([], ["hfprune_mc", "helaswag"])
    assert task_manager([], ["hfprune_mc"]).all_tasks == ["hfprune_mc"]  # local tasks skip the big index


@pytest.fixture
def local_task(tmp_path):
    """A task YAML of the user's own, reading a local JSONL file (what `include_path` is for)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [
        {"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0}
        for a, b in [(1, 2), (3, 4)]
    ]
    (folder / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "sums.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: my_sums
            dataset_path: json
            dataset_kwargs: {{data_files: {{test: {folder / "sums.jsonl"}}}}}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{q}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: label
            metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
            """
        )
    )
    return folder


def test_user_tasks_run_on_the_in_memory_model_and_leave_it_as_it_was(local_task, tiny_tokenizer):
    model = tiny_model().train()
    spec = EvalSpec(lm_eval={"tasks": ["my_sums"], "include_path": str(local_task)})
    torch.manual_seed(7)
    random.seed(7)
    expected_torch, expected_random = torch.rand(3), random.random()
    torch.manual_seed(7)
    random.seed(7)
    result = evaluate_lm(model, tiny_tokenizer, spec)
    # lm-eval seeds the global generators; afterwards they continue as if it had never run.
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_random
    assert model.training
    entry = result["results"]["my_sums@0"]
    assert (
        entry["samples"] == 2
        and entry["value"] in (0.0, 0.5, 1.0)
        and entry["metrics"] == {"acc": entry["value"]}
    )
    assert result["average"]["of"] == ["my_sums@0"]
    with pytest.raises(LmEvalError, match="reported no 'f1' metric; it reported: acc"):
        evaluate_lm(
            model,
            tiny_tokenizer,
            EvalSpec(
                lm_eval={"tasks": [{"task": "my_sums", "metric": "f1"}], "include_path": str(local_task)}
            ),
        )


def test_every_model_of_a_run_is_evaluated_offline(write_recipe, monkeypatch):
    def no_network(self, address):
        raise AssertionError(f"evaluation tried to reach {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    path = write_recipe(
        """\
          preset: quick
          lm_eval: {limit: 3}
        train:
          token_budget: 256
          seq_len: 32
          args: {per_device_train_batch_size: 4}
        """
    )
    metrics = pipeline.run(load_recipe(path)).metrics
    assert {"parent", "pruned", "continued", "scratch"} <= set(metrics)
    for model in ("parent", "pruned", "continued", "scratch"):
        lm = metrics[model]["lm_eval"]
        assert set(lm["results"]) == {"hfprune_mc@0", "hfprune_text@0"}
        assert lm["results"]["hfprune_mc@0"]["samples"] == 3
        assert 0 <= lm["average"]["value"] <= 1 and lm["average"]["of"] == ["hfprune_mc@0"]
        protocol = lm["protocol"]
        assert protocol["harness"] == harness_version() and protocol["harness"].startswith("lm-eval 0.4")
        assert (
            protocol["limit"] == 3 and protocol["seeds"]["fewshot"] == 1234 and protocol["preset"] == "quick"
        )
        assert protocol["tasks"] == ["hfprune_mc@0", "hfprune_text@0"] and protocol["max_length"] == 256
    text = {m: metrics[m]["lm_eval"]["results"]["hfprune_text@0"]["value"] for m in metrics}
    assert text["pruned"] != text["parent"] and text["continued"] != text["pruned"]
    card = (path.parent / "out" / "tiny" / "models" / "continued" / "README.md").read_text()
    assert "| hfprune_mc | 0-shot, acc |" in card and "| **average** | mean of 1 |" in card
