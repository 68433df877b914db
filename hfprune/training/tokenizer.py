"""The tokenizer of a parent hfprune pretrains itself (`parent.pretrain.tokenizer`, `hfprune.training.pretrain`).

Either an existing tokenizer (`from`: a Hub repo id or a local folder), or a byte-level BPE of
`vocab_size` tokens trained with the `tokenizers` library on the first `train_chars` characters of the
pretraining dataset in one fixed order (`corpus_head`): a full permutation by `TOKENIZER_ORDER_SEED` for a
dataset that is not streamed, so the text is a fair sample of the whole corpus, not its first files; a
streamed one through the pretraining's shuffle buffer (`hfprune.training.packing`). The order does not
depend on the run's seed, so neither does the tokenizer. The trained tokenizer behaves as the rest of
hfprune expects of a Llama tokenizer:

- `tokenizer(text)` opens with BOS and adds no EOS; with `add_special_tokens=False` (packing, calibration,
  evaluation windows) it adds nothing, and the windows put BOS in front themselves (`hfprune.data.texts.windows`);
- EOS separates packed documents (`hfprune.training.packing`); PAD is a token of its own, never trained on.

Its special tokens come first, so their ids are fixed before training: BOS 0, EOS 1, PAD 2. That is what
lets plans and dry runs build the parent's config (`special_token_ids`) before the tokenizer exists.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hfprune.data.texts import DatasetLike
from hfprune.errors import RunFailure
from hfprune.training.packing import DEFAULT_SHUFFLE_BUFFER, ordered_texts


BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # in id order: trained BPE vocabularies start with them
TOKENIZER_ORDER_SEED = 0  # one document order for every run seed: the tokenizer does not depend on it


class TokenizerError(RunFailure, ValueError):
    """The parent's tokenizer cannot be loaded or trained as the recipe asks."""


@dataclass(frozen=True)
class TokenIds:
    """What the parent's config takes from its tokenizer."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


def corpus_head(dataset: DatasetLike, chars: int, shuffle_buffer: int | None = None) -> Iterator[str]:
    """The dataset's documents in the tokenizer's order (see the module docstring), cut off after `chars`
    characters in all; `shuffle_buffer` as the pretraining's (`hfprune.training.packing.shuffle_buffer_of`)."""
    if shuffle_buffer is None and dataset.streaming:
        shuffle_buffer = DEFAULT_SHUFFLE_BUFFER
    left = chars
    for text in ordered_texts(dataset, shuffle_buffer, TOKENIZER_ORDER_SEED):
        yield text[:left]
        left -= len(text)
        if left <= 0:
            return


def train_bpe(texts: Iterator[str], vocab_size: int) -> Any:
    """A byte-level BPE of exactly `vocab_size` tokens (specials included), as a
    `transformers.PreTrainedTokenizerFast` with Llama's BOS/EOS behaviour (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is a token from the start: no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    if core.get_vocab_size() != vocab_size:
        raise TokenizerError(
            f"parent.pretrain.tokenizer: its training text yields only {core.get_vocab_size()} tokens, not "
            f"vocab_size {vocab_size}; lower vocab_size or raise train_chars"
        )
    bos = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer(source: str) -> Any:
    """An existing tokenizer (Hub repo id or folder); without a PAD token it pads with EOS."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise TokenizerError(
            f"parent.pretrain.tokenizer.from: cannot load a tokenizer from {source!r}: {err}"
        ) from None
    if tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"parent.pretrain.tokenizer.from: {source!r} has no EOS token, which separates packed documents"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def parent_tokenizer(spec: Any, dataset: DatasetLike, shuffle_buffer: int | None = None) -> Any:
    """The tokenizer `spec` (a `TokenizerSpec`) describes: loaded, or trained on `corpus_head(dataset)`."""
    if spec.from_ is not None:
        return load_tokenizer(spec.from_)
    return train_bpe(corpus_head(dataset, spec.train_chars, shuffle_buffer), spec.vocab_size)


def token_ids(tokenizer: Any) -> TokenIds:
    return TokenIds(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def planned_token_ids(spec: Any) -> TokenIds:
    """The ids `parent_tokenizer(spec, ...)` will have, without training anything: fixed for a BPE of
    `vocab_size`, read from the tokenizer named by `from` (once per process)."""
    if spec.from_ is None:
        return TokenIds(spec.vocab_size, *range(len(SPECIAL_TOKENS)))
    return _loaded_token_ids(spec.from_)


@functools.lru_cache(maxsize=8)
def _loaded_token_ids(source: str) -> TokenIds:
    return token_ids(load_tokenizer(source))
