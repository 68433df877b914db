"""The model-kind registry: a kind registered once (here a throwaway `distilled` kind, made like the
continued model and carded with its template) reaches the recipe, metrics table, cards, Hub repos and
report without any other code knowing its name."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from hfprune import kinds, pipeline
from hfprune.cards import render_card
from hfprune.cli import format_metrics_table
from hfprune.hub import published_kinds, repo_id_for
from hfprune.recipe import RecipeError, load_recipe
from hfprune.report import write_report


TRAIN = "train:\n  token_budget: 256\n  seq_len: 32\npush: {repo_prefix: org/tiny-run}\n"


@pytest.fixture
def distilled():
    kind = kinds.register(
        kinds.ModelKind(
            "distilled",
            kinds.Making.FROM_PRUNED,
            "the pruned model distilled from the parent",
            repo_suffix="-distilled",
            card_template="continued",
            tags=("distilled",),
            has_base_model=True,
            published_by_default=True,
        )
    )
    yield kind
    kinds.unregister(kind.name)
    assert "distilled" not in kinds.names()


def scores(ppl: float) -> dict:
    protocol = {"windows": 8, "seq_len": 64, "tokens": 504, "bos": True, "dataset": {"path": "x"}}
    return {"params": {"total": 1000}, "perplexity": {"pydoc": {"value": ppl, "protocol": protocol}}}


METRICS = {
    "parent": scores(11.0),
    "pruned": scores(55.0),
    "continued": {**scores(22.0), "tokens_trained": 256},
    "scratch": {**scores(33.0), "tokens_trained": 256},
}


def test_the_registry_describes_the_four_built_in_kinds():
    assert kinds.names() == ["parent", "pruned", "continued", "scratch"]
    assert kinds.trained_names() == kinds.default_runs() == ["continued", "scratch"]
    assert [k.name for k in kinds.carded()] == ["pruned", "continued", "scratch"]
    assert [k.name for k in kinds.comparison()] == ["continued", "scratch"]
    assert kinds.get("parent").folder is None and kinds.get("scratch").folder == "scratch"
    with pytest.raises(kinds.UnknownKindError, match="known kinds: parent, pruned, continued, scratch"):
        kinds.get("lora")
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(kinds.get("pruned"))


def test_a_registered_kind_is_a_valid_run_and_nothing_else_is(write_recipe, distilled):
    recipe = load_recipe(write_recipe(TRAIN), ["train.runs=[continued,distilled]"])
    assert recipe.train.runs == ["continued", "distilled"]
    assert load_recipe(write_recipe(TRAIN)).train.runs == ["continued", "scratch"]  # not a default run
    with pytest.raises(RecipeError, match="unknown run 'lora'; allowed: continued, scratch, distilled"):
        load_recipe(write_recipe(TRAIN), ["train.runs=[lora]"])


def test_a_registered_kind_gets_its_stages_in_run_order(write_recipe, distilled):
    recipe = load_recipe(write_recipe(TRAIN), ["train.runs=[distilled,scratch]", "push.enabled=true"])
    stages = pipeline.Pipeline(recipe).stages()
    assert stages == (
        "parent_eval",
        "prune",
        "pruned_eval",
        "train_distilled",
        "distilled_eval",
        "train_scratch",
        "scratch_eval",
        "card",
        "push",
    )
    plan = pipeline.describe_plan(recipe)
    assert plan["stages"]["train_distilled"] == "will run"


def test_a_registered_kind_is_a_metrics_column_a_repo_and_a_card(write_recipe, distilled):
    metrics = {**METRICS, "distilled": {**scores(18.0), "tokens_trained": 256}}
    header = format_metrics_table(metrics).splitlines()[0].split()
    assert header[:6] == ["perplexity", "parent", "pruned", "continued", "scratch", "distilled"]
    assert repo_id_for("org/run", "distilled") == "org/run-distilled"
    available = ["pruned", "continued", "scratch", "distilled"]
    assert published_kinds(False, available) == ["continued", "scratch", "distilled"]
    assert published_kinds(True, available) == ["continued", "scratch", "distilled", "pruned"]

    overrides = ["train.runs=[continued,scratch,distilled]", "parent.hub_id=org/tiny-parent"]
    recipe = load_recipe(write_recipe(TRAIN), overrides)
    pipeline.run(recipe, stop_after="prune")
    report = json.loads((recipe.output_path / "models/pruned/prune_report.json").read_text())
    training = {"token_budget": 256, "tokens_trained": 256, "tokens_per_step": 128, "steps": 2}
    card = str(render_card("distilled", recipe, report, metrics, None, "cmd", training))
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "org/tiny-parent"
    assert "distilled" in front["tags"] and ModelCard(card).data.model_name == "tiny-run-distilled"
    assert (
        "| metric | protocol | parent | pruned | continued | scratch | **distilled** (this model) |" in card
    )
    assert "| perplexity (pydoc) | 8 x 64 tokens | 11.00 | 55.00 | 22.00 | 33.00 | 18.00 |" in card
    assert "and `distilled` the pruned model distilled from the parent." in card
    assert "[org/tiny-run-distilled]" in str(
        render_card("continued", recipe, report, metrics, None, "c", training)
    )


def test_a_registered_kind_is_a_report_column(tmp_path, distilled):
    folder = tmp_path / "run"
    (folder / "models" / "pruned").mkdir(parents=True)
    recipe = {"prune": {"method": "shortgpt", "ratio": 0.5}, "eval": {"perplexity": [{"name": "pydoc"}]}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "train": {"token_budget": 256}}))
    metrics = {**METRICS, "distilled": {**scores(18.0), "curve": [{"tokens": 0, "perplexity": 60.0}]}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    data = write_report(tmp_path)
    assert data["rows"][0]["distilled"] == 18.0 and data["rows"][0]["gap"] == 22.0 - 33.0
    assert set(data["rows"][0]["curves"]) == {"distilled"}
    text = (tmp_path / "report.md").read_text()
    assert "| pruned | continued | scratch | distilled | continued - scratch |" in text
    assert "| 55.00 | 22.00 | 33.00 | 18.00 | -11.00 |" in text


def test_a_registered_trained_kind_runs_through_the_pipeline(write_recipe, distilled):
    """Made like `continued` (trained from the pruned weights), with nothing but the registry entry."""
    extra = "train:\n  token_budget: 256\n  seq_len: 32\n  runs: [distilled]\n  args: {per_device_train_batch_size: 4}\n"
    recipe = load_recipe(write_recipe(extra))
    summary = pipeline.run(recipe)
    assert [o.stage for o in summary.outcomes if o.ran][3:] == ["train_distilled", "distilled_eval", "card"]
    entry = summary.metrics["distilled"]
    assert entry["tokens_trained"] >= 256 and "pydoc" in entry["perplexity"]
    folder = recipe.output_path / "models" / "distilled"
    assert (folder / "model.safetensors").is_file() and (folder / "training_report.json").is_file()
    card = ModelCard.load(folder / "README.md")
    assert "distilled" in card.data.tags and "**distilled** (this model)" in card.text
    assert not any(o.ran for o in pipeline.run(recipe).outcomes)  # a rerun finds it all current
