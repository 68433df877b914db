"""The model-kind registry: a kind registered once (here a throwaway `polished` kind, made like the
continued model and carded with its template) reaches the recipe, metrics table, cards, Hub repos and
report without any other code knowing its name."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from hfprune import kinds
from hfprune.cli import format_metrics_table
from hfprune.hub import published_kinds, repo_id_for
from hfprune.pipeline import runner as pipeline
from hfprune.publish.cards import render_card
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import load_recipe
from hfprune.report.writer import write_report


TRAIN = "train:\n  token_budget: 256\n  seq_len: 32\npush: {repo_prefix: org/tiny-run}\n"


@pytest.fixture
def polished():
    kind = kinds.register(
        kinds.ModelKind(
            "polished",
            kinds.Making.FROM_PRUNED,
            "the pruned model polished from the parent",
            repo_suffix="-polished",
            card_template="continued",
            tags=("polished",),
            has_base_model=True,
            published_by_default=True,
        )
    )
    yield kind
    kinds.unregister(kind.name)
    assert "polished" not in kinds.names()


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
    assert kinds.names()[:4] == ["parent", "pruned", "continued", "scratch"]
    assert kinds.default_runs() == ["continued", "scratch"]
    assert [k.name for k in kinds.carded()][:3] == ["pruned", "continued", "scratch"]
    assert [k.name for k in kinds.comparison()] == ["continued", "scratch"]
    assert kinds.get("parent").folder is None and kinds.get("scratch").folder == "scratch"
    with pytest.raises(kinds.UnknownKindError, match="known kinds: parent, pruned, continued, scratch"):
        kinds.get("finetuned")
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(kinds.get("pruned"))


def test_a_registered_kind_is_a_valid_run_and_nothing_else_is(write_recipe, polished):
    recipe = load_recipe(write_recipe(TRAIN), ["train.runs=[continued,polished]"])
    assert recipe.train.runs == ["continued", "polished"]
    assert load_recipe(write_recipe(TRAIN)).train.runs == ["continued", "scratch"]  # not a default run
    with pytest.raises(RecipeError, match="unknown run 'finetuned'; allowed: continued, scratch, "):
        load_recipe(write_recipe(TRAIN), ["train.runs=[finetuned]"])


def test_a_registered_kind_gets_its_stages_in_run_order(write_recipe, polished):
    recipe = load_recipe(write_recipe(TRAIN), ["train.runs=[polished,scratch]", "push.enabled=true"])
    stages = pipeline.Pipeline(recipe).stages()
    assert stages == (
        "parent_eval",
        "prune",
        "pruned_eval",
        "train_polished",
        "polished_eval",
        "train_scratch",
        "scratch_eval",
        "card",
        "push",
    )
    plan = pipeline.describe_plan(recipe)
    assert plan["stages"]["train_polished"] == "will run"


def test_a_registered_kind_is_a_metrics_column_a_repo_and_a_card(write_recipe, polished):
    metrics = {**METRICS, "polished": {**scores(18.0), "tokens_trained": 256}}
    header = format_metrics_table(metrics).splitlines()[0].split()
    assert header[:6] == ["perplexity", "parent", "pruned", "continued", "scratch", "polished"]
    assert repo_id_for("org/run", "polished") == "org/run-polished"
    available = ["pruned", "continued", "scratch", "polished"]
    assert published_kinds(False, available) == ["continued", "scratch", "polished"]
    assert published_kinds(True, available) == ["continued", "scratch", "polished", "pruned"]

    overrides = ["train.runs=[continued,scratch,polished]", "parent.hub_id=org/tiny-parent"]
    recipe = load_recipe(write_recipe(TRAIN), overrides)
    pipeline.run(recipe, stop_after="prune")
    report = json.loads((recipe.output_path / "models/pruned/prune_report.json").read_text())
    training = {"token_budget": 256, "tokens_trained": 256, "tokens_per_step": 128, "steps": 2}
    card = str(render_card("polished", recipe, report, metrics, None, "cmd", training))
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "org/tiny-parent"
    assert "polished" in front["tags"] and ModelCard(card).data.model_name == "tiny-run-polished"
    assert "| metric | protocol | parent | pruned | continued | scratch | **polished** (this model) |" in card
    assert (
        "| perplexity (pydoc) | train split, 8 x 64 tokens | 11.00 | 55.00 | 22.00 | 33.00 | 18.00 |" in card
    )
    assert "and `polished` the pruned model polished from the parent." in card
    assert "[org/tiny-run-polished]" in str(
        render_card("continued", recipe, report, metrics, None, "c", training)
    )


def test_a_registered_kind_is_a_report_column(tmp_path, polished):
    folder = tmp_path / "run"
    (folder / "models" / "pruned").mkdir(parents=True)
    recipe = {"prune": {"method": "shortgpt", "ratio": 0.5}, "eval": {"perplexity": [{"name": "pydoc"}]}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "train": {"token_budget": 256}}))
    metrics = {**METRICS, "polished": {**scores(18.0), "curve": [{"tokens": 0, "perplexity": 60.0}]}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    data = write_report(tmp_path)
    assert data["rows"][0]["polished"] == 18.0 and data["rows"][0]["gap"] == 22.0 - 33.0
    assert set(data["rows"][0]["curves"]) == {"polished"}
    text = (tmp_path / "report.md").read_text()
    assert "| pruned | continued | scratch | polished | continued - scratch |" in text
    assert "| 55.00 | 22.00 | 33.00 | 18.00 | -11.00 |" in text


def test_a_registered_trained_kind_runs_through_the_pipeline(write_recipe, polished):
    """Made like `continued` (trained from the pruned weights), with nothing but the registry entry."""
    extra = "train:\n  token_budget: 256\n  seq_len: 32\n  runs: [polished]\n  args: {per_device_train_batch_size: 4}\n"
    recipe = load_recipe(write_recipe(extra))
    summary = pipeline.run(recipe)
    assert [o.stage for o in summary.outcomes if o.ran][3:] == ["train_polished", "polished_eval", "card"]
    entry = summary.metrics["polished"]
    assert entry["tokens_trained"] >= 256 and "pydoc" in entry["perplexity"]
    folder = recipe.output_path / "models" / "polished"
    assert (folder / "model.safetensors").is_file() and (folder / "training_report.json").is_file()
    card = ModelCard.load(folder / "README.md")
    assert "polished" in card.data.tags and "**polished** (this model)" in card.text
    assert not any(o.ran for o in pipeline.run(recipe).outcomes)  # a rerun finds it all current
