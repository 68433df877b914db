"""Shared fixtures: a tiny random Llama parent saved as a local checkpoint, with a small real tokenizer.

The vocabulary is kept small (it dominates CPU time); the tokenizer is a byte-level BPE trained in
a fraction of a second on the Python documentation that ships with the interpreter.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

VOCAB_SIZE = 384

# Tiny models are dominated by per-op overhead: one thread is faster than two fighting over 2 cores.
torch.set_num_threads(1)


def train_tiny_tokenizer(vocab_size: int = VOCAB_SIZE):
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(topics.values()), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_shape(num_hidden_layers: int) -> dict:
    """The fields every tiny test parent shares, whatever its family."""
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def tiny_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**tiny_shape(num_hidden_layers=8), **overrides})


def tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides))
    # Random init leaves every layer near the identity; larger weights make layers differ in influence.
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.down_proj, layer.self_attn.o_proj):
                lin.weight.mul_(torch.rand(()) * 8 + 1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_parent_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local parent checkpoint (config, safetensors, tokenizer) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("parent") / "tiny-llama"
    tiny_model().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def tiny_recipe_yaml(name: str, output_dir: Path, parent: Path, prune: str = "", max_windows: int = 8) -> str:
    """The YAML of a recipe on the tiny parent: calibration and a pydoc perplexity set, `prune` spliced in."""
    return f"name: {name}\noutput_dir: {output_dir}\nparent:\n  model: {parent}\n{prune}" + textwrap.dedent(
        f"""\
            calibration:
              num_samples: 4
              seq_len: 64
            eval:
              perplexity:
                - name: pydoc
                  dataset: {{path: "hfprune:pydoc_topics", split: test}}
                  seq_len: 64
                  max_windows: {max_windows}
            """
    )


@pytest.fixture
def write_recipe(tmp_path, tiny_parent_dir):
    """Write a tiny-parent recipe into tmp_path (extra YAML appended) and return its path."""

    def write(extra: str = "", name: str = "tiny", ratio: float = 0.5, method: str = "shortgpt") -> Path:
        prune = f"prune:\n  method: {method}\n  ratio: {ratio}\n"
        text = tiny_recipe_yaml(name, tmp_path / "out" / name, tiny_parent_dir, prune=prune, max_windows=8)
        path = tmp_path / f"{name}.yaml"
        path.write_text(text + textwrap.dedent(extra))
        return path

    return write


def tiny_family_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random parent of any registered family (`hfprune.architectures`), built from its own
    config class. Biases and norm weights are randomised (they start at 0 and 1), so a surgery that
    drops or misplaces one changes the output."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**tiny_shape(num_hidden_layers=4), **overrides}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
            elif param.dim() == 1:  # a norm's weight
                param.uniform_(0.5, 1.5)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.mul_(torch.rand(()) * 8 + 1)  # as in tiny_model: layers that differ in influence
    return model.eval()


# -- a small real file system, without root ---------------------------------------------------------
# The command runs in a private mount namespace with a tmpfs of the asked size on `mountpoint` (the
# mount goes with the namespace); with `SMALL_FS_COPY` set, what the tmpfs holds is copied there first.
_SMALL_FS_SCRIPT = """
mount -t tmpfs -o size="$SMALL_FS_SIZE" tmpfs "$SMALL_FS_DIR" || exit 97
"$@"; rc=$?
[ -z "$SMALL_FS_COPY" ] || cp -a "$SMALL_FS_DIR/." "$SMALL_FS_COPY/" || rc=98
[ -z "$SMALL_FS_UMOUNT" ] || umount "$SMALL_FS_DIR"
exit $rc
"""
# A user and mount namespace needs no root on most kernels; as root, a mount namespace, or a plain mount.
SMALL_FS_WAYS = {
    "user namespace": (["unshare", "--user", "--map-root-user", "--mount"], False),
    "mount namespace (root)": (["unshare", "--mount"], False),
    "plain mount (root)": ([], True),
}
_small_fs_way: list[tuple[list[str], bool]] = []


def small_fs_way() -> tuple[list[str], bool]:
    """The first way of `SMALL_FS_WAYS` that mounts a tmpfs here; fails the test, with every reason, if none."""
    import subprocess
    import tempfile

    if _small_fs_way:
        return _small_fs_way[0]
    reasons = []
    for name, (prefix, umount) in SMALL_FS_WAYS.items():
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, "SMALL_FS_DIR": folder, "SMALL_FS_SIZE": "64k", "SMALL_FS_COPY": ""}
            env["SMALL_FS_UMOUNT"] = "1" if umount else ""
            argv = [*prefix, "sh", "-c", _SMALL_FS_SCRIPT, "sh", "true"]
            try:
                done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            except OSError as err:
                reasons.append(f"{name}: {err}")
                continue
            if done.returncode == 0:
                _small_fs_way.append((prefix, umount))
                return prefix, umount
            reasons.append(f"{name}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    pytest.fail("no way to mount a small tmpfs on this machine: " + "; ".join(reasons))


def run_on_small_fs(
    mountpoint: Path,
    size: str,
    argv: list[str],
    *,
    copy_to: Path | None = None,
    env: dict | None = None,
    timeout: float = 600,
):
    """Run `argv` with a fresh tmpfs of `size` (`2m`, `64m`) mounted on `mountpoint`, seen by it alone;
    with `copy_to`, what the tmpfs holds when it ends is copied there. Returns the `CompletedProcess`."""
    import subprocess

    prefix, umount = small_fs_way()
    mountpoint.mkdir(parents=True, exist_ok=True)
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
    env = {**(env or os.environ), "SMALL_FS_DIR": str(mountpoint), "SMALL_FS_SIZE": size}
    env.update(SMALL_FS_COPY=str(copy_to or ""), SMALL_FS_UMOUNT="1" if umount else "")
    command = [*prefix, "sh", "-c", _SMALL_FS_SCRIPT, "sh", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def planned_shape(config, method: str, ratio: float, options: dict | None = None):
    """The target shape the pruner `method` (with `options`) would prune `config` to, from the config alone."""
    from hfprune.pruners import build_pruner

    return build_pruner(method, options).plan(config, ratio)


def scratch_twin_of(model, folder: Path, **kwargs):
    """The scratch twin of `model` the way the train stage builds it: saved to `folder`, then rebuilt
    from there (`scratch_twin_from_folder`) in the model's dtype."""
    from hfprune.models.twin import scratch_twin_from_folder

    model.save_pretrained(folder)
    return scratch_twin_from_folder(folder, dtype=model.dtype, **kwargs)


def tiny_llama(seed: int = 0, *, vocab: int, layers: int = 2):
    """A tiny Llama as its constructor initialises it under `seed` (unlike `tiny_model`: no weights
    scaled, train mode), padding with id 0: the model of the training tests. `vocab` covers the test's
    token ids; rotary tables do not depend on the position limit, so 64 serves every test's length."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(
        vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=64, pad_token_id=0
    )
    return LlamaForCausalLM(config)


def masked_nonzeros(model, masks: dict) -> int:
    """Nonzero weights where a keep-mask is False: what `SparsityMaskCallback` must hold at zero,
    counted without it. Names are compared as the plain model spells them (through PEFT and wrappers)."""
    from hfprune.callbacks.sparsity_mask import canonical_name

    params = {canonical_name(name): param for name, param in model.named_parameters()}
    return sum(
        int(torch.count_nonzero(params[canonical_name(name)].detach()[~keep])) for name, keep in masks.items()
    )
