"""A parent made from nothing: the `pretrain` stage's work, for a recipe with `parent.pretrain`.

The first stage of such a run (`hfprune.pipeline.stages.pretrain`). `pretrain_parent(recipe)` gets the tokenizer
(`hfprune.training.tokenizer`: an existing one, or a byte-level BPE trained on the pretraining text),
builds a `LlamaConfig` from `parent.pretrain.config` and the tokenizer's ids, initialises the model on
the CPU from the parent's own seed stream (`Role.PARENT_INIT`, so no twin ever starts from the parent's
initial weights), and trains it with `hfprune.training.train.train_model`: the train stage's packed stream,
`PruneTrainer`, exact token accounting, checkpoints and resume, on the accelerator when there is one.

The result goes to `parent.model` (default `<output_dir>/models/parent`; a sweep's cells share
`<sweep>/models/parent`) as a plain checkpoint: weights, config, tokenizer, a card, and
`pretraining.json` (the training report and the fingerprint of the pretraining inputs: the pretrain
section and the seed). The folder is published in one rename. A folder that already holds a parent
of the same inputs is used as it is, untouched; otherwise the work happens in `.<name>.pretrain/` beside
it (its lock, the cached tokenizer and the checkpoints of these inputs), which a rerun after a kill
resumes from and which is removed once the parent is published.

Before the parent exists, plans and dry runs get its config from `planned_parent_config`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

from hfprune import __version__, distributed
from hfprune.models.structure import count_parameters
from hfprune.models.twin import seeded_model
from hfprune.outputs import (
    LOCK_FILE,
    atomic_dir,
    distributed_staging_dir,
    output_lock,
    read_json,
    remove_stale_temporaries,
    write_json,
    write_text,
)
from hfprune.seeds import Role, role_seed
from hfprune.training.packing import shuffle_buffer_of
from hfprune.training.tokenizer import TokenIds, parent_tokenizer, planned_token_ids, token_ids


logger = logging.getLogger(__name__)

PRETRAINING_FILE = "pretraining.json"
CARD_FILE = "README.md"


def pretrain_fingerprint(recipe: Any) -> str:
    """What the parent is made of: the pretrain section and the seed (its init and data order)."""
    inputs = {"pretrain": recipe.parent.pretrain.model_dump(mode="json"), "seed": recipe.seed}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def parent_folder(recipe: Any) -> Path:
    return Path(recipe.parent.model).expanduser()


def work_root(folder: Path) -> Path:
    """Where the parent is made before it is published: `.<name>.pretrain/` beside its folder."""
    return folder.with_name(f".{folder.name}.pretrain")


def recorded(folder: Path) -> dict[str, Any] | None:
    """The `pretraining.json` of a parent folder, if it holds one."""
    record = read_json(folder / PRETRAINING_FILE) if folder.is_dir() else None
    return record if isinstance(record, dict) else None


def holds_parent(folder: Path, fingerprint: str) -> bool:
    """Whether `folder` holds a complete parent pretrained from the inputs `fingerprint` names."""
    record = recorded(folder)
    complete = all((folder / name).is_file() for name in ("config.json", "model.safetensors"))
    return complete and record is not None and record.get("fingerprint") == fingerprint


def parent_config(pretrain: Any, ids: TokenIds) -> LlamaConfig:
    """The parent's architecture: `pretrain.config`, with the vocabulary and special ids of its tokenizer."""
    return LlamaConfig(
        **pretrain.config,
        vocab_size=ids.vocab_size,
        bos_token_id=ids.bos_token_id,
        eos_token_id=ids.eos_token_id,
        pad_token_id=ids.pad_token_id,
    )


def planned_parent_config(spec: Any) -> LlamaConfig | None:
    """The config a `parent` section with `pretrain` will have, built from the section alone (nothing is
    trained); None when `spec.model` already holds a parent made from this pretrain section, whose own
    config is then the one to read, or when the section has no `pretrain` (a parent loaded as it is).
    The seed changes weights, never shapes, so it is not compared."""
    if getattr(spec, "pretrain", None) is None:
        return None
    record = recorded(Path(spec.model).expanduser())
    if record and record.get("inputs", {}).get("pretrain") == spec.pretrain.model_dump(mode="json"):
        return None
    return parent_config(spec.pretrain, planned_token_ids(spec.pretrain.tokenizer))


def initial_parent(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """The untrained parent: `LlamaForCausalLM(config)` on the CPU in float32 under `torch.manual_seed`
    of `seed`, the global RNG untouched (as the scratch twins are made, `hfprune.models.twin`)."""
    return seeded_model(LlamaForCausalLM, config, seed)


def pretrain_parent(recipe: Any) -> dict[str, Any]:
    """Make the parent of `recipe` (see the module docstring); its pretraining record, for metrics.json.

    Every process calls this under torchrun (training is collective); only the main process writes.
    """
    from hfprune.training.train import training_work_dir  # the Trainer's imports: only when training

    folder, fingerprint = parent_folder(recipe), pretrain_fingerprint(recipe)
    if holds_parent(folder, fingerprint):
        logger.info("parent %s: already pretrained from these inputs, used as it is", folder)
        return recorded(folder)["pretraining"]  # type: ignore[index]
    root = work_root(folder)
    with output_lock(root):  # one maker per parent folder, even across processes of a sweep
        if distributed.is_main_process():
            remove_stale_temporaries(folder.parent, recursive=False, only=folder.name)
        distributed.barrier()
        if holds_parent(folder, fingerprint):  # made by the process that held the lock before us
            return recorded(folder)["pretraining"]  # type: ignore[index]
        record = _pretrain(recipe, folder, training_work_dir(root / "run", fingerprint), fingerprint)
    if distributed.is_main_process():
        for empty in (root / LOCK_FILE.parent, root):  # unless another process is at work in it
            with contextlib.suppress(OSError):
                empty.rmdir()
    return record


def _pretrain(recipe: Any, folder: Path, work_dir: Path, fingerprint: str) -> dict[str, Any]:
    """Train the parent in `work_dir` (resuming its checkpoints) and publish it to `folder`."""
    from hfprune.training.train import save_trained, train_model

    spec = recipe.parent.pretrain
    tokenizer = _work_tokenizer(spec, work_dir)
    config = parent_config(spec, token_ids(tokenizer))
    model = initial_parent(config, role_seed(recipe.seed, Role.PARENT_INIT))
    logger.info(
        "pretraining the parent (%d layers, hidden %d, vocabulary %d) on %d tokens",
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
        spec.token_budget,
    )
    trainer, outcome = train_model(
        model,
        tokenizer,
        spec,
        run="pretrain",
        seed=role_seed(recipe.seed, Role.DATA_ORDER),
        work_dir=work_dir,
    )
    dataset = {**spec.dataset.model_dump(mode="json", exclude_defaults=True), "split": spec.dataset.split}
    record = {key: value for key, value in outcome.to_dict().items() if key != "run"} | {"dataset": dataset}
    with distributed_staging_dir(folder) as staging:
        save_trained(trainer, tokenizer, outcome, staging)
        if distributed.is_main_process():
            inputs = {"pretrain": spec.model_dump(mode="json"), "seed": recipe.seed}
            write_json(
                staging / PRETRAINING_FILE,
                {"fingerprint": fingerprint, "inputs": inputs, "pretraining": record},
            )
            write_text(staging / CARD_FILE, parent_card(recipe, record, count_parameters(model).total))
    if distributed.is_main_process():
        # Published: the checkpoints (weights and optimizer state) only served resuming.
        shutil.rmtree(work_dir, ignore_errors=True)
    return record


def _work_tokenizer(spec: Any, work_dir: Path) -> Any:
    """The parent's tokenizer, made once per set of inputs: a resumed run reads the one it trained."""
    from transformers import AutoTokenizer

    saved = work_dir / "tokenizer"
    if distributed.is_main_process() and not saved.is_dir():
        tokenizer = parent_tokenizer(spec.tokenizer, spec.dataset, shuffle_buffer_of(spec))
        with atomic_dir(saved) as tmp:
            tokenizer.save_pretrained(tmp)
    distributed.barrier()
    return AutoTokenizer.from_pretrained(saved)


def describe_dataset(dataset: Any) -> str:
    """A dataset spec in a few words, e.g. `hfprune:pydoc_topics` (split train)."""
    where = f"`{dataset.path}`" + (f" ({dataset.name})" if dataset.name else "")
    files = f", files {dataset.data_files}" if dataset.data_files else ""
    return f"{where} (split {dataset.split}{files})"


def parent_card(recipe: Any, record: dict[str, Any], params: int) -> str:
    """The parent's model card: what it is, what it was trained on, how to load it."""
    spec = recipe.parent.pretrain
    tokenizer = (
        f"`{spec.tokenizer.from_}`"
        if spec.tokenizer.from_
        else f"a byte-level BPE of {spec.tokenizer.vocab_size} tokens trained on the first "
        f"{spec.tokenizer.train_chars:,} characters of the same dataset in a fixed shuffled order"
    )
    shape = ", ".join(f"{key} {value}" for key, value in spec.config.items())
    return (
        "---\nlibrary_name: transformers\ntags:\n- hfprune\n- pretrained-from-scratch\n---\n\n"
        f"# {recipe.name}: parent\n\n"
        f"A Llama model pretrained from random initialisation by hfprune {__version__} on "
        f"{record['tokens_trained']:,} tokens of {describe_dataset(spec.dataset)}: {record['steps']} optimizer "
        f"steps of {record['tokens_per_step']:,} tokens, sequences of {spec.seq_len}, seed {recipe.seed}. "
        f"It is the parent that the recipe `{recipe.name}` prunes; its pretraining tokens are the first "
        "part of that study's pipeline budget.\n\n"
        f"- parameters: {params:,}\n- architecture: {shape}\n- tokenizer: {tokenizer}\n"
        f"- pretraining record: `{PRETRAINING_FILE}`\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")\n'
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")\n```\n'
    )


def pretrain_problems(recipe: Any) -> list[tuple[str, str]]:
    """(key, message) for a pretrain section that cannot train as asked, found before any work
    (`hfprune.checks.preflight`): its `args`, a budget smaller than one optimizer step, a `seq_len` longer
    than the parent's positions."""
    from hfprune.recipe.train_args import build_training_arguments, training_args_problems
    from hfprune.training.train import TrainingSetupError

    spec, where = recipe.parent.pretrain, "parent.pretrain."
    problems = [
        (where + key.removeprefix("train."), msg) for key, msg in training_args_problems(spec, recipe.seed)
    ]
    if not problems:
        try:
            build_training_arguments(spec, recipe.seed)
        except TrainingSetupError as err:
            problems.append((where + "token_budget", str(err).removeprefix("train.token_budget ")))
    limit = spec.config.get("max_position_embeddings", LlamaConfig().max_position_embeddings)
    if spec.seq_len > limit:
        message = (
            f"{spec.seq_len} is longer than the parent's {limit} positions (config.max_position_embeddings)"
        )
        problems.append((where + "seq_len", message))
    return problems
