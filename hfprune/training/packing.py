"""Training data for the train stage: documents packed into a deterministic stream of fixed-length blocks.

`PackedTokenStream` reads the documents in a seeded order, tokenizes them, puts an EOS after each, and
cuts the token stream into blocks of exactly `seq_len` tokens. Two streams built with the same arguments
yield the same blocks, which is how the continued and the scratch run see the identical tokens.
`skip_tokens` drops an exact number of tokens from the start, for data the parent already saw (the paper
starts continued training at a later shard).

The order (`shuffle_buffer_of`, recorded as `data_order` with the training outcome): a dataset that is
not streamed is permuted as a whole per seed (`hfprune.data.texts.permuted_texts`, `Dataset.shuffle`), so
any prefix of the stream (a parent's pretraining tokens, the text its tokenizer is trained on) is a fair
sample of the whole corpus; a streamed dataset has no length to permute and goes through a seeded buffer
of `DEFAULT_SHUFFLE_BUFFER` documents, which draws its first documents from the head of the stream only.
A recipe's `shuffle_buffer` sets a buffer for either (1 keeps the source order). A parent pretrained here
and the models trained after it read the same stream for the same seed (`Role.DATA_ORDER`), so the
training's `skip_tokens` past the parent's tokens keeps the two disjoint.

Distributed training: under `transformers.Trainer` (accelerate 1.15), an `IterableDataset` is read by
the main process only, which concatenates one batch per process and hands each process its own slice
(`dispatch_batches` defaults to True for iterable datasets). Every rank therefore trains on different
blocks, and the global order does not depend on the number of processes. Loops that give every rank its
own copy of the stream instead should pass `num_shards=world_size, shard_index=rank`. DataLoader workers
are handled here: each takes every n-th block.

Resuming a Trainer run re-reads the stream and skips the batches already trained on, so resumption needs
no extra state; `skip_tokens` is for the data offset, not for resumption.
"""

import functools
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from hfprune.data.texts import PIECE_CHARS, DatasetLike, iter_texts, permuted_texts


logger = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 1000  # documents in the buffer of a streamed dataset that names none


class PackedTokenStream(IterableDataset):
    """Finite, restartable stream of packed `seq_len`-token blocks.

    Each item is `{"input_ids", "labels", "attention_mask"}`, three int64 tensors of length `seq_len`
    (`labels` equal `input_ids`, the mask is all ones: packed blocks have no padding). The stream ends
    when `texts()` runs out; a trailing partial block is dropped.

    Args:
        texts: Called at the start of every pass; returns an iterable of documents.
        tokenizer: Anything with `tokenizer(text, add_special_tokens=False)["input_ids"]` and
            `eos_token_id` (a Hugging Face tokenizer).
        seq_len: Tokens per block.
        skip_tokens: Tokens to drop at the start of the (shuffled) stream.
        seed: Seed of the document shuffle.
        shuffle_buffer: Documents held in the shuffle buffer; 1 keeps the source order. None: `texts`
            permutes the documents itself, called with each pass's seed (`pass_seed`) instead of no
            argument, e.g. `lambda seed: permuted_texts(spec, seed)`.
        num_shards: Number of disjoint shards the blocks are dealt into (for per-rank copies).
        shard_index: Which shard this instance yields, in `[0, num_shards)`.

    Example:
        >>> stream = PackedTokenStream(lambda: iter_texts(spec), tokenizer, seq_len=2048, seed=0)
        >>> next(iter(stream))["input_ids"].shape  # doctest: +SKIP
        torch.Size([2048])
    """

    def __init__(
        self,
        texts: Callable[..., Iterable[str]],
        tokenizer: Any,
        seq_len: int,
        *,
        skip_tokens: int = 0,
        seed: int = 0,
        shuffle_buffer: int | None = DEFAULT_SHUFFLE_BUFFER,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> None:
        if seq_len < 1 or skip_tokens < 0 or (shuffle_buffer is not None and shuffle_buffer < 1):
            raise ValueError(
                f"need seq_len >= 1, skip_tokens >= 0, shuffle_buffer >= 1; got {seq_len}, {skip_tokens}, "
                f"{shuffle_buffer}"
            )
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("the tokenizer has no eos_token_id, which separates packed documents")
        self.texts = texts
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.skip_tokens = skip_tokens
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for another pass; the Trainer calls this at every epoch (also when resuming)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        stride = self.num_shards * num_workers
        mine = self.shard_index * num_workers + worker_id
        for index, block in enumerate(self.blocks()):
            if index % stride == mine:
                ids = torch.tensor(block, dtype=torch.long)
                yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def blocks(self) -> Iterator[list[int]]:
        """Every block of the stream as a list of token ids, before sharding."""
        buffer: list[int] = []
        for ids in self.token_chunks():
            buffer.extend(ids)
            while len(buffer) >= self.seq_len:
                yield buffer[: self.seq_len]
                del buffer[: self.seq_len]

    def token_chunks(self) -> Iterator[list[int]]:
        """Tokenized documents, each followed by EOS, with the first `skip_tokens` tokens removed."""
        to_skip = self.skip_tokens
        for text in self.documents():
            ids = [*self.tokenizer(text, add_special_tokens=False)["input_ids"], self.tokenizer.eos_token_id]
            if to_skip >= len(ids):
                to_skip -= len(ids)
                continue
            yield ids[to_skip:]
            to_skip = 0

    def documents(self) -> Iterator[str]:
        """Documents in this pass's order: permuted by the source, or shuffled by a seeded buffer."""
        if self.shuffle_buffer is None:
            yield from self.texts(pass_seed(self.seed, self.epoch))
            return
        yield from buffer_shuffled(
            self.texts(), self.shuffle_buffer, random.Random(f"{self.seed}:{self.epoch}")
        )


def pass_seed(seed: int, epoch: int) -> int:
    """The permutation seed of a pass: `seed` itself for the first, a distinct one for each later epoch."""
    return seed + (epoch << 32)  # recipe seeds are 31-bit: no two (seed, epoch) pairs collide


def buffer_shuffled(texts: Iterable[str], size: int, rng: random.Random) -> Iterator[str]:
    """`texts` through a shuffle buffer of `size` documents: reproducible for any source size, but a
    document can only move about `size` places, so the first ones come from the head of the source."""
    pool: list[str] = []
    for text in texts:
        pool.append(text)
        if len(pool) >= size:
            # Swap a random document to the end and emit it: O(1) per document.
            pick = rng.randrange(len(pool))
            pool[pick], pool[-1] = pool[-1], pool[pick]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def shuffle_buffer_of(spec: Any) -> int | None:
    """The shuffle of a `train` or `parent.pretrain` section: its `shuffle_buffer` when set, else a full
    permutation (None) for a dataset that is not streamed and `DEFAULT_SHUFFLE_BUFFER` for a streamed one."""
    if spec.shuffle_buffer is not None:
        return spec.shuffle_buffer
    return DEFAULT_SHUFFLE_BUFFER if spec.dataset.streaming else None


def describe_order(buffer: int | None) -> str:
    """The document order in words, as the run records it (`data_order`)."""
    if buffer is None:
        return f"full permutation per seed of documents cut into pieces of at most {PIECE_CHARS} characters"
    if buffer == 1:
        return "source order"
    return f"{buffer}-document shuffle buffer"


def ordered_texts(dataset: DatasetLike, buffer: int | None, seed: int) -> Iterator[str]:
    """The documents of `dataset` in the order of a stream's first pass with this `buffer` and `seed`."""
    if buffer is None:
        return permuted_texts(dataset, seed)
    return buffer_shuffled(iter_texts(dataset), buffer, random.Random(f"{seed}:0"))


def training_stream(spec: Any, tokenizer: Any, seed: int) -> PackedTokenStream:
    """The packed stream of a recipe's `train` (or `parent.pretrain`) section: every trained kind of a
    run, and a parent pretrained here, read it identically for the same seed."""
    buffer = shuffle_buffer_of(spec)
    # Without a buffer the source permutes itself: it is called with each pass's seed.
    texts = functools.partial(permuted_texts if buffer is None else iter_texts, spec.dataset)
    return PackedTokenStream(
        texts,
        tokenizer,
        spec.seq_len,
        skip_tokens=spec.skip_tokens,
        seed=seed,
        shuffle_buffer=buffer,
    )
