"""Model cards for every model of a run: front matter the Hub understands, the side-by-side results
table, the provenance of each kind, and `hfprune card` re-rendering them from an output folder."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from hfprune.cli import main
from hfprune.pipeline import runner as pipeline
from hfprune.publish.cards import CardError, render_card, write_cards
from hfprune.publish.provenance import dataset_reference, shareable_recipe
from hfprune.recipe.schema import load_recipe


TRAIN = """
train:
  token_budget: 4096
  seq_len: 32
  dataset: {path: HuggingFaceFW/fineweb-edu, name: sample-10BT}
push: {repo_prefix: org/tiny-run}
"""
TRAINING = {"token_budget": 4096, "tokens_trained": 4096, "tokens_per_step": 1024, "steps": 4}


def scores(ppl: float, acc: float) -> dict:
    protocol = {"windows": 8, "seq_len": 64, "dataset": {"path": "hfprune:pydoc_topics", "split": "test"}}
    entry = {"task": "hfprune_mc", "num_fewshot": 0, "metric": "acc", "value": acc}
    lm_eval = {
        "results": {"hfprune_mc@0": entry},
        "average": {"value": acc, "of": ["hfprune_mc@0"], "definition": "mean"},
        "protocol": {"harness": "lm-eval 0.4.13", "limit": 3, "seeds": {"fewshot": 1234}},
    }
    return {
        "params": {"total": 1000},
        "perplexity": {"pydoc": {"value": ppl, "protocol": protocol}},
        "lm_eval": lm_eval,
    }


@pytest.fixture
def pruned(write_recipe, tiny_parent_dir):
    """A recipe with training and Hub ids, pruned for real (its prune_report), plus made-up scores."""
    recipe = load_recipe(write_recipe(TRAIN), ["parent.hub_id=org/tiny-parent"])
    pipeline.run(recipe, stop_after="prune")
    report = json.loads((recipe.output_path / "models/pruned/prune_report.json").read_text())
    metrics = {
        "parent": scores(11.0, 0.5),
        "pruned": scores(55.0, 0.25),
        "continued": {**scores(22.0, 0.375), "tokens_trained": 4096},
        "scratch": {**scores(33.0, 0.125), "tokens_trained": 4096},
    }
    return recipe, report, metrics


def front_matter(card: ModelCard) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


def test_only_models_made_from_the_parents_weights_declare_it_as_base_model(pruned):
    recipe, report, metrics = pruned
    cards = {
        kind: render_card(kind, recipe, report, metrics, "apache-2.0", "hfprune run r.yaml", TRAINING)
        for kind in ("pruned", "continued", "scratch")
    }
    for kind, card in cards.items():
        data = front_matter(card)
        assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
        assert {"hfprune", "shortgpt", "depth-pruning"} <= set(data["tags"])
        assert ("base_model" in data) == (kind != "scratch")
    assert front_matter(cards["continued"])["base_model"] == "org/tiny-parent"
    # Only Hub datasets are listed: the training set, never local files or the built-in pydoc corpus.
    assert "datasets" not in front_matter(cards["pruned"])
    assert front_matter(cards["continued"])["datasets"] == front_matter(cards["scratch"])["datasets"]
    assert front_matter(cards["scratch"])["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    scratch = str(cards["scratch"])
    assert (
        "random-init baseline" in scratch
        and "[org/tiny-parent](https://huggingface.co/org/tiny-parent)" in scratch
    )
    assert "freshly initialised" in scratch and "random-init" in front_matter(cards["scratch"])["tags"]


def test_model_index_carries_this_models_results(pruned):
    recipe, report, metrics = pruned
    card = render_card("scratch", recipe, report, metrics, None, "hfprune run r.yaml", TRAINING)
    data = ModelCard(str(card)).data  # parsed back the way the Hub reads it
    assert data.model_name == "tiny-run-scratch"
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("pydoc", "perplexity"): 33.0, ("hfprune_mc@0", "acc"): 0.125}
    shots = {r.dataset_name: r.dataset_args for r in data.eval_results}
    assert shots["hfprune_mc@0"] == {"num_few_shot": 0}


def test_body_puts_every_model_side_by_side_and_says_how_it_was_made(pruned):
    recipe, report, metrics = pruned
    body = str(render_card("continued", recipe, report, metrics, None, "hfprune run r.yaml", TRAINING))
    assert "| metric | protocol | parent | pruned | **continued** (this model) | scratch |" in body
    assert "| perplexity (pydoc) | test split, 8 x 64 tokens | 11.00 | 55.00 | 22.00 | 33.00 |" in body
    assert "| hfprune_mc | 0-shot, acc | 0.5000 | 0.2500 | 0.3750 | 0.1250 |" in body
    assert "| **average** | mean of 1 | **0.5000** | **0.2500** | **0.3750** | **0.1250** |" in body
    assert "| tokens trained |  | - | - | 4,096 | 4,096 |" in body
    assert f"requested 0.5, achieved {report['ratio_achieved']:.4f}" in body
    assert (
        "trained on 4,096 tokens" in body
        and "[HuggingFaceFW/fineweb-edu](https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu)" in body
    )
    assert "4 samples x 64 tokens" in body  # the calibration
    assert 'from_pretrained("org/tiny-run")' in body and "[org/tiny-run-scratch]" in body
    assert "hfprune run r.yaml" in body and "hfprune run recipe.yaml" in body
    assert shareable_recipe(recipe) in body


def test_cards_before_any_training_show_what_exists(pruned):
    recipe, report, metrics = pruned
    only = {k: metrics[k] for k in ("parent", "pruned")}
    body = str(render_card("pruned", recipe, report, only, None, "cmd"))
    assert "| metric | protocol | parent | **pruned** (this model) |" in body and "tokens trained" not in body


def test_write_cards_needs_a_pruned_model(tmp_path, write_recipe):
    recipe = load_recipe(write_recipe())
    with pytest.raises(CardError, match="prune_report.json does not exist"):
        write_cards(tmp_path, recipe, {}, None, "cmd")


def test_card_command_rerenders_the_cards_of_a_moved_output_folder(write_recipe, tmp_path):
    path = write_recipe()
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(path)]).exit_code == 0
    moved = tmp_path / "moved"
    shutil.move(path.parent / "out" / "tiny", moved)
    written = (moved / "models/pruned/README.md").read_text()
    (moved / "models/pruned/README.md").unlink()
    result = runner.invoke(main, ["card", str(moved)])
    assert result.exit_code == 0, result.output
    assert str(moved / "models/pruned/README.md") in result.output
    rendered = (moved / "models/pruned/README.md").read_text()
    assert rendered.replace(str(moved), "OUT") == written.replace(str(path.parent / "out" / "tiny"), "OUT")
    missing = runner.invoke(main, ["card", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "recipe.yaml does not exist" in missing.output


def test_a_local_parent_is_named_never_shown_as_a_path(write_recipe, tiny_parent_dir):
    recipe = load_recipe(write_recipe(TRAIN))  # parent.model is a local folder, no hub_id
    pipeline.run(recipe, stop_after="prune")
    out = recipe.output_path
    report = json.loads((out / "models/pruned/prune_report.json").read_text())
    body = str(render_card("pruned", recipe, report, {}, None, f"hfprune run {out}/recipe.yaml"))
    assert f"a local checkpoint (`{tiny_parent_dir.name}`)" in body
    assert str(tiny_parent_dir) not in body and str(out) not in body  # no path of the maker's machine
    assert "base_model" not in front_matter(render_card("pruned", recipe, report, {}, None, "c"))
    shipped = (out / "models/pruned/recipe.yaml").read_text()  # the recipe the card says to rerun
    assert str(tiny_parent_dir) not in shipped and "point it at your copy" in shipped
    assert yaml.safe_load(shipped)["parent"]["model"] == tiny_parent_dir.name


def test_hfprune_prune_alone_writes_no_empty_results_table(write_recipe):
    recipe = load_recipe(write_recipe())
    pipeline.run(recipe, stop_after="prune")
    card = (recipe.output_path / "models/pruned/README.md").read_text()
    assert "## Results" not in card and "| metric |" not in card and "Not evaluated" not in card


def test_a_gguf_parent_is_said_to_be_dequantized_and_linked_by_hub_id(pruned):
    recipe, report, metrics = pruned
    gguf = recipe.model_copy(update={"parent": recipe.parent.model_copy(update={"gguf_file": "m.Q4_1.gguf"})})
    body = str(render_card("continued", gguf, report, metrics, None, "c", TRAINING))
    assert "dequantized from the GGUF file `m.Q4_1.gguf`" in body
    assert "[org/tiny-parent](https://huggingface.co/org/tiny-parent)" in body
    assert "dequantized" not in str(render_card("continued", recipe, report, metrics, None, "c", TRAINING))


def test_data_are_hub_links_or_local_file_names():
    hub = {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}
    assert dataset_reference(hub) == (
        "[HuggingFaceFW/fineweb-edu](https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu) "
        "(config sample-10BT, split train)"
    )
    local = {"path": "json", "data_files": "/home/me/data/train.jsonl", "split": "train"}
    assert dataset_reference(local) == "local json files `train.jsonl` (split train)"


def test_a_sparse_card_gives_one_parameter_count_the_non_zeros_and_how_to_keep_the_masks(write_recipe):
    recipe = load_recipe(write_recipe(TRAIN, method="wanda"), ["parent.hub_id=org/tiny-parent"])
    pipeline.run(recipe, stop_after="prune")
    report = json.loads((recipe.output_path / "models/pruned/prune_report.json").read_text())
    stored, nonzero = report["params_before"]["total"], report["params_after"]["total"]
    metrics = {"pruned": {"params": {"total": stored}}}
    body = str(render_card("pruned", recipe, report, metrics, None, "c"))
    assert f"| parameters | {stored:,} | {stored:,} |" in body  # the Size table
    assert f"| parameters |  | {stored:,} |" in body  # the results table: the same count
    assert f"| non-zero parameters (after the sparsity mask) | {stored:,} | {nonzero:,} |" in body
    assert 'SparsityMaskCallback(load_masks("sparsity_masks.safetensors"))' in body
    assert "merge_lora(peft_model, masks)" in body


def test_recovery_cards_state_the_recovery_the_teacher_and_the_budget(pruned):
    recipe, report, metrics = pruned
    recipe = load_recipe(
        write_path := recipe.output_path.parent.parent / "tiny.yaml",
        ["parent.hub_id=org/tiny-parent", "train.runs=[continued,distilled,lora,scratch]",
         "train.distill.divergence=jsd", "train.distill.beta=0.3", "train.lora.rank=8"],
    )  # fmt: skip
    assert write_path.is_file()
    metrics = {**metrics, "distilled": metrics["continued"], "lora": metrics["continued"]}
    distilled = str(render_card("distilled", recipe, report, metrics, None, "c", TRAINING))
    assert "distilled from its parent" in distilled and "jsd (beta 0.3)" in distilled
    assert "teacher [org/tiny-parent](https://huggingface.co/org/tiny-parent)" in distilled
    assert "Token budget 4,096" in distilled and "alpha 1.0, temperature 1.0" in distilled
    assert (
        "**distilled** (this model)" in distilled
        and front_matter(ModelCard(distilled))["base_model"] == "org/tiny-parent"
    )
    lora = str(render_card("lora", recipe, report, metrics, None, "c", TRAINING))
    assert "rank 8, alpha 32.0" in lora and "q_proj, k_proj" in lora and "without `peft`" in lora
    assert "tiny-run-lora" in lora and "lora" in front_matter(ModelCard(lora))["tags"]
