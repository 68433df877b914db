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
