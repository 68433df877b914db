"""PackedTokenStream: exact blocks, exact skip, reproducible order, disjoint shards."""

import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from hfprune.training.packing import PackedTokenStream


SEQ = 16


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # Byte-level BPE without merges: one token per byte, built instantly and without files.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def documents(count: int = 40) -> list[str]:
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "pruned", "scratch", "token"]
    return [f"doc{i} " + " ".join(rng.choices(words, k=rng.randint(1, 12))) for i in range(count)]


def stream(tokenizer, **kwargs) -> PackedTokenStream:
    docs = documents()
    return PackedTokenStream(lambda: iter(docs), tokenizer, SEQ, **kwargs)


def flat(blocks) -> list[int]:
    return [token for block in blocks for token in block]


def test_blocks_are_exact_and_follow_the_source_without_shuffle(tokenizer):
    items = list(stream(tokenizer, shuffle_buffer=1))
    expected = flat(
        [*tokenizer(doc, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for doc in documents()
    )
    assert len(items) == len(expected) // SEQ > 10
    for item in items:
        assert set(item) == {"input_ids", "labels", "attention_mask"}
        assert item["input_ids"].shape == (SEQ,) and item["input_ids"].dtype == torch.long
        assert torch.equal(item["labels"], item["input_ids"])
        assert bool(item["attention_mask"].eq(1).all())
    assert flat(item["input_ids"].tolist() for item in items) == expected[: len(items) * SEQ]


@pytest.mark.parametrize("skip", [1, 37, 5 * SEQ, 203])
def test_skip_tokens_drops_exactly_that_many(tokenizer, skip):
    every_token = flat(stream(tokenizer, seed=3).token_chunks())  # the whole shuffled stream, unpacked
    skipped = flat(stream(tokenizer, seed=3, skip_tokens=skip).blocks())
    assert len(skipped) == (len(every_token) - skip) // SEQ * SEQ
    assert skipped == every_token[skip : skip + len(skipped)]


def test_same_seed_same_stream_and_restartable(tokenizer):
    first, second = stream(tokenizer, seed=1, shuffle_buffer=8), stream(tokenizer, seed=1, shuffle_buffer=8)
    blocks = list(first.blocks())
    assert blocks == list(second.blocks())
    assert blocks == list(first.blocks())  # a second pass replays the same stream
    assert blocks != list(stream(tokenizer, seed=2, shuffle_buffer=8).blocks())
    assert blocks != list(stream(tokenizer, seed=1, shuffle_buffer=1).blocks())  # the shuffle is real
    first.set_epoch(1)
    assert list(first.blocks()) != blocks  # a new epoch reshuffles, reproducibly


def test_shards_and_workers_are_disjoint_and_complete(tokenizer):
    blocks = list(stream(tokenizer, seed=4).blocks())
    shards = [
        [item["input_ids"].tolist() for item in stream(tokenizer, seed=4, num_shards=2, shard_index=i)]
        for i in (0, 1)
    ]
    assert shards[0] == blocks[0::2] and shards[1] == blocks[1::2]

    loader = DataLoader(stream(tokenizer, seed=4), batch_size=None, num_workers=2)
    from_workers = [item["input_ids"].tolist() for item in loader]
    assert sorted(from_workers) == sorted(blocks)


def test_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        stream(tokenizer, skip_tokens=-1)
    with pytest.raises(ValueError, match="shard_index"):
        stream(tokenizer, num_shards=2, shard_index=2)

    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="eos_token_id"):
        PackedTokenStream(lambda: iter([]), NoEos(), SEQ)
