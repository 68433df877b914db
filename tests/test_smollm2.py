"""Real-model checks on SmolLM2-135M (GGUF from a PyPI wheel): slow, run with `make test-slow`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hfprune.data.assets import fetch_all
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.schema import load_recipe


ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    os.chdir(ROOT)  # the quickstart recipe refers to .cache/hfprune relative to the repository
    fetch_all()
    out = tmp_path_factory.mktemp("quickstart")
    overrides = [f"output_dir={out}", "eval.perplexity.0.max_windows=8", "eval.perplexity.1.max_windows=8"]
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", overrides)
    pipeline.run(recipe)
    return out


def test_real_parent_is_sane_and_pruning_hurts_it(quickstart_run):
    metrics = json.loads((quickstart_run / "metrics.json").read_text())
    parent = metrics["parent"]["perplexity"]["hamlet"]["value"]
    pruned = metrics["pruned"]["perplexity"]["hamlet"]["value"]
    assert 5 < parent < 100, "a pretrained 135M model reads Shakespeare far better than chance"
    assert pruned > 2 * parent, "removing half the decoder without training must cost perplexity"
    assert metrics["parent"]["params"]["total"] == 134_515_008


def test_half_the_layers_and_half_the_non_embedding_parameters(quickstart_run):
    report = json.loads((quickstart_run / "models/pruned/prune_report.json").read_text())
    assert len(report["kept_layers"]) == 15
    assert abs(report["ratio_achieved"] - 0.5) < 0.001
    config = json.loads((quickstart_run / "models/pruned/config.json").read_text())
    assert config["num_hidden_layers"] == 15 and config["tie_word_embeddings"] is True
    card = (quickstart_run / "models/pruned/README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card


def test_quickstart_trains_both_runs_and_the_pruned_start_wins(quickstart_run):
    from hfprune.report.writer import write_report

    metrics = json.loads((quickstart_run / "metrics.json").read_text())
    ppl = {k: metrics[k]["perplexity"]["hamlet"]["value"] for k in ("pruned", "continued", "scratch")}
    for run in ("continued", "scratch"):
        assert 4096 <= metrics[run]["tokens_trained"] < 4096 + 512  # within one global batch (2 x 256)
        assert [p["tokens"] for p in metrics[run]["curve"]][:2] == [0, 2048]
    assert ppl["continued"] < ppl["pruned"] / 10, "a few thousand tokens heal most of the one-shot loss"
    assert ppl["continued"] * 5 < ppl["scratch"], "the pruned start beats random init on the same tokens"
    data = write_report(quickstart_run)
    assert data["rows"][0]["gap"] < 0 and "curves.png" in data["plots"]


def test_wanda_then_continued_and_scratch_training(tmp_path):
    """The whole factory on the real model: sparse pruning, both runs on one budget, masks held."""
    from safetensors.torch import load_file

    from hfprune.masks.storage import load_masks

    os.chdir(ROOT)
    fetch_all()
    overrides = [f"output_dir={tmp_path}", "train.token_budget=8192", "eval.perplexity.0.max_windows=8"]
    summary = pipeline.run(load_recipe(ROOT / "recipes/smollm2_wanda_train.yaml", overrides))
    metrics = summary.metrics
    masks = load_masks(tmp_path / "models/pruned/sparsity_masks.safetensors")
    for run in ("continued", "scratch"):
        assert 8192 <= metrics[run]["tokens_trained"] < 8192 + 1024  # within one global batch (4 x 256)
        weights = load_file(tmp_path / "models" / run / "model.safetensors")
        for name, keep in masks.items():
            assert (weights[name][~keep] == 0).all(), f"{run}: a pruned weight of {name} was revived"
    ppl = {
        k: metrics[k]["perplexity"]["hamlet"]["value"] for k in ("parent", "pruned", "continued", "scratch")
    }
    assert ppl["continued"] < ppl["pruned"], "continued training recovers part of the pruning loss"
    assert ppl["continued"] < ppl["scratch"], "at a tiny budget the pruned initialisation is far ahead"
