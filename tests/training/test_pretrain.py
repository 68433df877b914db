"""A parent hfprune pretrains itself (`parent.pretrain`): the pretrain stage, its checkpoint, its skip on
rerun and when another run finds it made, its config before it exists (validate, dry run, preflight),
the whole pipeline on it, its initial weights against the scratch twin's, and a kill mid-pretraining.

Tiny throughout: a byte-level BPE of 320 tokens, hidden 32, 2 layers, 8 steps of 4 x 32 tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfprune._faults import ENV
from hfprune.checks.preflight import preflight
from hfprune.cli import main
from hfprune.data.texts import iter_texts, permuted_texts
from hfprune.hub import load_parent_config
from hfprune.models.twin import scratch_twin_from_folder
from hfprune.outputs import _TEMPORARY
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.base import default_dataset
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import load_recipe
from hfprune.seeds import Role, role_seed
from hfprune.sweep.grid import load_sweep
from hfprune.training.pretrain import initial_parent, planned_parent_config, pretrain_fingerprint, work_root
from hfprune.training.tokenizer import TOKENIZER_ORDER_SEED, TokenizerError, corpus_head, train_bpe


VOCAB = 320
PRETRAIN_TOKENS = 1024  # 8 steps of 4 x 32


def recipe_text(out: Path, parent_model: Path | None = None, extra: str = "") -> str:
    model = f"  model: {parent_model}\n" if parent_model else ""
    return (
        f"name: pre\noutput_dir: {out}\nparent:\n{model}"
        + textwrap.dedent(
            f"""\
              pretrain:
                token_budget: {PRETRAIN_TOKENS}
                seq_len: 32
                config: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
                          num_key_value_heads: 2, max_position_embeddings: 128}}
                tokenizer: {{vocab_size: {VOCAB}, train_chars: 200000}}
                args: {{per_device_train_batch_size: 4, learning_rate: 1.0e-3, save_steps: 2}}
            prune: {{method: shortgpt, ratio: 0.5}}
            calibration: {{num_samples: 4, seq_len: 32}}
            eval:
              perplexity:
                - {{name: pydoc, dataset: {{path: "hfprune:pydoc_topics", split: test}}, seq_len: 32, max_windows: 4}}
            train:
              runs: [continued, scratch]
              token_budget: 256
              seq_len: 32
              args: {{per_device_train_batch_size: 4}}
            """
        )
        + extra
    )


def write(folder: Path, name: str = "pre", **kwargs) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(recipe_text(folder / "out" / name, **kwargs))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The output folder of a whole run on a parent it pretrains: pretrain, prune, continued, scratch."""
    folder = tmp_path_factory.mktemp("pretrained")
    pipeline.run(load_recipe(write(folder)))
    return folder / "out" / "pre"


def test_the_pipeline_runs_on_a_parent_it_pretrains(pretrained):
    parent = pretrained / "models" / "parent"
    model = AutoModelForCausalLM.from_pretrained(parent)  # a plain checkpoint
    tokenizer = AutoTokenizer.from_pretrained(parent)
    assert model.config.vocab_size == len(tokenizer) == VOCAB and model.config.num_hidden_layers == 2
    ids = tokenizer("def f(): pass")["input_ids"]  # Llama's way: BOS in front, no EOS
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer("def f(): pass", add_special_tokens=False)["input_ids"] == ids[1:]
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def f(): pass"

    metrics = json.loads((pretrained / "metrics.json").read_text())
    record = metrics["parent"]["pretraining"]
    assert metrics["parent"]["pretrained_tokens"] == record["tokens_trained"] == PRETRAIN_TOKENS
    assert record["token_budget"] == PRETRAIN_TOKENS and record["steps"] == 8
    assert record["dataset"] == {"path": "hfprune:pydoc_topics", "split": "train"}
    assert metrics["continued"]["tokens_trained"] == metrics["scratch"]["tokens_trained"] == 256
    assert (
        AutoModelForCausalLM.from_pretrained(pretrained / "models" / "pruned").config.num_hidden_layers == 1
    )
    assert {"perplexity", "params"} <= metrics["parent"].keys() and "perplexity" in metrics["scratch"]

    saved = json.loads((parent / "pretraining.json").read_text())
    assert saved["fingerprint"] == pretrain_fingerprint(load_recipe(pretrained / "recipe.yaml"))
    card = (parent / "README.md").read_text()
    assert (
        "pretrained from random initialisation by hfprune" in card
        and "1,024 tokens of `hfprune:pydoc" in card
    )
    # The work folder (lock, tokenizer, checkpoints) goes once the parent is published; no temporaries.
    assert not work_root(parent).exists()
    assert not [p for p in pretrained.rglob("*") if _TEMPORARY.match(p.name)]


def test_a_rerun_leaves_the_parent_alone(pretrained):
    weights = pretrained / "models" / "parent" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    summary = pipeline.run(load_recipe(pretrained / "recipe.yaml"))
    assert not any(outcome.ran for outcome in summary.outcomes)
    assert weights.stat().st_mtime_ns == before


def test_another_run_finds_the_parent_made_and_records_it(pretrained, tmp_path):
    """What every sweep cell after the first does: the parent folder holds these inputs' parent."""
    parent = pretrained / "models" / "parent"
    before = {p.name: p.stat().st_mtime_ns for p in parent.iterdir()}
    recipe = load_recipe(write(tmp_path, "other", parent_model=parent))
    summary = pipeline.Pipeline(recipe, only=("pretrain",)).execute()
    assert [o.stage for o in summary.outcomes if o.ran] == ["pretrain"]
    assert {p.name: p.stat().st_mtime_ns for p in parent.iterdir()} == before
    assert summary.metrics["parent"]["pretrained_tokens"] == PRETRAIN_TOKENS
    # After it exists, its config is read from the folder.
    assert planned_parent_config(recipe.parent) is None
    assert load_parent_config(recipe.parent).architectures == ["LlamaForCausalLM"]


def test_sweep_cells_share_one_parent(tmp_path):
    path = write(tmp_path, "swept")
    path.write_text(
        path.read_text().replace("  token_budget: 256\n", "") + "sweep:\n  token_budget: [128, 256]\n"
    )
    sweep = load_sweep(path)
    models = {cell.recipe.parent.model for cell in sweep.cells}
    assert models == {str(sweep.output_path / "models" / "parent")}
    assert len({pretrain_fingerprint(cell.recipe) for cell in sweep.cells}) == 1


def test_validate_and_dry_run_work_before_the_parent_exists(tmp_path):
    path = write(tmp_path)
    recipe = load_recipe(path)
    config = load_parent_config(recipe.parent)
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (VOCAB, 2, 32)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 2)
    preflight(recipe)
    result = CliRunner().invoke(main, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0 and "not checked" not in result.output, result.output
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"], catch_exceptions=False)
    plan = json.loads(result.stdout)
    assert (
        list(plan["stages"])[:2] == ["pretrain", "parent_eval"]
        and plan["parent_shape"]["vocab_size"] == VOCAB
    )
    assert not (tmp_path / "out").exists()  # nothing made, nothing trained


def test_pretrain_problems_are_reported_before_any_work(tmp_path):
    text = recipe_text(tmp_path / "out").replace(f"token_budget: {PRETRAIN_TOKENS}", "token_budget: 64")
    text = text.replace("seq_len: 32\n    config", "seq_len: 256\n    config")  # the pretrain section's
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(RecipeError) as err:
        preflight(load_recipe(tmp_path / "bad.yaml"))
    keys = {key for key, _ in err.value.problems}
    assert {"parent.pretrain.token_budget", "parent.pretrain.seq_len"} <= keys, err.value.problems


def test_the_parent_starts_from_other_weights_than_the_scratch_twin(pretrained):
    """The parent's init has its own seed stream: never the random init the scratch twin starts from."""
    parent = pretrained / "models" / "parent"
    config = AutoModelForCausalLM.from_pretrained(parent).config
    start = initial_parent(config, role_seed(0, Role.PARENT_INIT)).state_dict()
    twin = scratch_twin_from_folder(parent, seed=role_seed(0, Role.TWIN_INIT)).state_dict()
    same_seed = scratch_twin_from_folder(parent, seed=role_seed(0, Role.PARENT_INIT)).state_dict()
    matrices = [name for name, value in start.items() if value.dim() == 2]
    assert all(torch.equal(start[name], same_seed[name]) for name in start)  # only the seed differs
    assert not any(torch.equal(start[name], twin[name]) for name in matrices)


def test_the_tokenizer_reads_the_head_of_a_fixed_permutation_of_the_corpus():
    dataset = default_dataset("train")
    head = list(corpus_head(dataset, 5000))
    permuted = "".join(permuted_texts(dataset, TOKENIZER_ORDER_SEED))
    assert sum(map(len, head)) == 5000 and "".join(head) == permuted[:5000]
    assert "".join(head) != "".join(iter_texts(dataset))[:5000]  # a fair sample, not the first documents
    first, second = train_bpe(iter(head), 300), train_bpe(iter(head), 300)
    assert len(first) == 300 and first.get_vocab() == second.get_vocab()
    with pytest.raises(TokenizerError, match="lower vocab_size or raise train_chars"):
        train_bpe(iter(["tiny text"]), 400)


def test_an_existing_tokenizer_gives_the_vocabulary(tmp_path, tiny_parent_dir):
    text = recipe_text(tmp_path / "out").replace(
        f"{{vocab_size: {VOCAB}, train_chars: 200000}}", f"{{from: {tiny_parent_dir}}}"
    )
    (tmp_path / "from.yaml").write_text(text)
    config = load_parent_config(load_recipe(tmp_path / "from.yaml").parent)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (384, 0, 1)


def test_an_external_parent_records_its_declared_pretraining_tokens(write_recipe):
    recipe = load_recipe(write_recipe(), ["parent.pretrained_tokens=15000"])
    summary = pipeline.Pipeline(recipe, only=("parent_eval",)).execute()
    assert (
        summary.metrics["parent"]["pretrained_tokens"] == 15000 and "perplexity" in summary.metrics["parent"]
    )


def test_a_kill_mid_pretraining_resumes_to_the_same_parent(tmp_path, pretrained):
    path = write(tmp_path, "killed")
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", ENV: "checkpoint_save:2"}
    killed = subprocess.run(
        [sys.executable, "-m", "hfprune", "prune", str(path)], env=environ, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    recipe = load_recipe(path)
    assert (work_root(Path(recipe.parent.model)) / "run" / "checkpoints" / "checkpoint-2").is_dir()
    pipeline.run(recipe, stop_after="prune")
    record = json.loads((recipe.output_path / "metrics.json").read_text())["parent"]["pretraining"]
    assert record["resumed_from"] == "checkpoint-2" and record["tokens_trained"] == PRETRAIN_TOKENS
    mine, reference = (
        load_file(p / "models" / "parent" / "model.safetensors") for p in (recipe.output_path, pretrained)
    )
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)
    assert not work_root(Path(recipe.parent.model)).exists()


def test_evaluating_on_the_pretraining_text_is_flagged(tmp_path):
    from hfprune.checks.heldout import overlap_problems

    recipe = load_recipe(write(tmp_path))
    assert not overlap_problems(recipe)  # pydoc's test split is held out from its train split
    on_train = load_recipe(write(tmp_path), ["eval.perplexity.0.dataset.split=train"])
    messages = [message for key, message in overlap_problems(on_train) if key == "eval.perplexity.0.dataset"]
    assert any("overlaps the pretraining data" in message for message in messages), messages
