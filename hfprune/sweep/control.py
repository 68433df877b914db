"""The sweep's control (`sweep.control: true`): proof that the train stage can make a parent.

One control per seed replicate of a sweep (`hfprune.sweep.grid.Control`), run by `hfprune.sweep.runner`
after that seed's cells. It trains the parent's own shape (config and tokenizer of the seed's pretrained
parent) from a random initialisation of its own seed stream (`Role.CONTROL_INIT`: neither the parent's
nor a twin's) on the parent's P pretraining tokens (the pretrain section's dataset, skip and budget, in
the seed's data order), through `hfprune.training.train.train_model` with the `train` section the twins
train with (schedule family, learning rate, batch). It is scored on the cells' held-out sets, and the
report (`hfprune.report.control`) sets it beside the parent of the same seed: the two must agree within
seed noise, or the pipeline's twins are not trained the way the parent was and the study says so.

Output: `<sweep>/control[-s<seed>]/` holding `control.json` (the fingerprint of its inputs, its
training record and its perplexity per held-out set, as a cell's metrics.json records a kind's) and
`model/`. No `metrics.json`: the folder is not a run of the report's tables. A folder holding the
record of the same inputs is up to date and left as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from hfprune import distributed
from hfprune.outputs import output_lock, read_json, write_json
from hfprune.seeds import Role, role_seed
from hfprune.sweep.grid import Control


logger = logging.getLogger(__name__)

RECORD = "control.json"
MODEL = "model"


def control_fingerprint(control: Control) -> str:
    """What the control is made of: the parent (its pretrain section and seed), the train section the
    twins use (but its budget and runs) and the evaluation."""
    recipe = control.recipe
    inputs = {
        "parent": recipe.fingerprint("parent", "seed"),
        "train": recipe.train.model_dump(mode="json", exclude={"token_budget", "runs"}),
        "eval": recipe.fingerprint("eval"),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def control_status(control: Control) -> str:
    """'finished' when the folder holds the record of these inputs, else 'to run'."""
    record = read_json(control.output_path / RECORD, None)
    current = isinstance(record, dict) and record.get("fingerprint") == control_fingerprint(control)
    return "finished" if current else "to run"


def control_spec(control: Control) -> Any:
    """The train section the twins use, on the parent's pretraining tokens: the pretrain section's
    dataset, skip and budget (P), everything else (schedule, learning rate, batch) the twins'."""
    recipe = control.recipe
    pretrain = recipe.parent.pretrain
    update = {
        "token_budget": pretrain.token_budget,
        "dataset": pretrain.dataset,
        "skip_tokens": pretrain.skip_tokens,
        "seq_len": pretrain.seq_len,
    }
    return recipe.train.model_copy(update=update)


def run_control(control: Control) -> dict[str, Any]:
    """Make the control of `control.seed` (its parent first, when no cell made it yet); its record."""
    from hfprune.training.pretrain import pretrain_parent  # the Trainer's imports: only when training

    fingerprint = control_fingerprint(control)
    if control_status(control) == "finished":
        logger.info("control %s: up to date", control.id)
        return read_json(control.output_path / RECORD, {})
    pretrain_parent(control.recipe)  # the seed's parent, as its cells' pretrain stage makes it
    with output_lock(control.output_path):
        record = _train_and_score(control, fingerprint)
    return record


def _train_and_score(control: Control, fingerprint: str) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from hfprune.models.twin import causal_lm_class, seeded_model
    from hfprune.training.sharding import trained_model_for_eval
    from hfprune.training.train import save_trained, train_model, training_work_dir

    recipe, folder = control.recipe, control.output_path
    parent = Path(recipe.parent.model).expanduser()
    config, tokenizer = AutoConfig.from_pretrained(parent), AutoTokenizer.from_pretrained(parent)
    init_seed = role_seed(recipe.seed, Role.CONTROL_INIT)
    model = seeded_model(causal_lm_class(config), config, init_seed)
    spec = control_spec(control)
    logger.info(
        "control %s: the parent's shape from init seed %d on %d tokens",
        control.id,
        init_seed,
        spec.token_budget,
    )
    work_dir = training_work_dir(folder / ".hfprune" / "train", fingerprint)
    trainer, outcome = train_model(
        model, tokenizer, spec, run="control", seed=role_seed(recipe.seed, Role.DATA_ORDER), work_dir=work_dir
    )
    save_trained(trainer, tokenizer, outcome, folder / MODEL)
    evaluable = trained_model_for_eval(trainer)
    if not distributed.is_main_process():
        return {}
    record = {
        "fingerprint": fingerprint,
        "seed": recipe.seed,
        "init_seed": init_seed,
        "parent_model": str(parent),
        "tokens_trained": outcome.tokens_trained,
        "training": outcome.to_dict(),
        "perplexity": _scores(recipe, evaluable, folder / MODEL, tokenizer),
    }
    write_json(folder / RECORD, record)
    shutil.rmtree(work_dir, ignore_errors=True)  # the checkpoints only served resuming
    return record


def _scores(recipe: Any, model: Any, saved: Path, tokenizer: Any) -> dict[str, Any]:
    """Perplexity on every held-out set of the cells' eval section, where the cells evaluate."""
    from transformers import AutoModelForCausalLM

    from hfprune.eval.perplexity import perplexity_scores
    from hfprune.models.placement import place, resolve_device

    model = model if model is not None else AutoModelForCausalLM.from_pretrained(saved, dtype="auto")
    model.eval()
    place(model, resolve_device(recipe.parent.device), stage="control_eval")
    logger.info("scoring the control")
    return perplexity_scores(model, tokenizer, recipe.eval)
