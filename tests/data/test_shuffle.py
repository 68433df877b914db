"""Training data drawn evenly from a finite corpus: a full permutation per seed, a buffer only when streamed."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from hfprune.data.texts import PIECE_CHARS, DatasetError, iter_texts, permuted_texts, pieces
from hfprune.recipe.base import DatasetSpec
from hfprune.recipe.training import TokenTraining
from hfprune.training.packing import (
    DEFAULT_SHUFFLE_BUFFER,
    describe_order,
    shuffle_buffer_of,
    training_stream,
)


DOCUMENTS = 3 * DEFAULT_SHUFFLE_BUFFER  # more than a buffer holds, so a buffer and a permutation differ
HEAD = 40  # documents looked at from the start of a stream


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(DOCUMENTS)) + "\n")
    return path


def section(corpus: Path, **overrides) -> TokenTraining:
    dataset = DatasetSpec(path="json", data_files=str(corpus), streaming=overrides.pop("streaming", False))
    return TokenTraining(**{"token_budget": 1000, "dataset": dataset, "seq_len": 16, **overrides})


def first_indices(spec: TokenTraining, tokenizer, seed: int = 0) -> list[int]:
    documents = training_stream(spec, tokenizer, seed).documents()
    return [int(next(documents).removeprefix("doc ")) for _ in range(HEAD)]


def test_without_a_setting_a_finite_dataset_is_permuted_as_a_whole(corpus, tiny_tokenizer):
    spec = section(corpus)
    assert spec.shuffle_buffer is None and shuffle_buffer_of(spec) is None
    first = first_indices(spec, tiny_tokenizer)
    # The first documents come from the whole index range, not from the first buffer's worth of it.
    assert max(first) > 2 * DEFAULT_SHUFFLE_BUFFER and sum(i >= DOCUMENTS // 2 for i in first) >= HEAD // 4
    # That is `datasets`' own full permutation for the seed.
    rows = datasets.load_dataset("json", data_files=str(corpus), split="train").shuffle(seed=0)
    assert first == [int(row["text"].removeprefix("doc ")) for row in rows.select(range(HEAD))]
    # Every document exactly once per pass.
    every = list(training_stream(spec, tiny_tokenizer, 0).documents())
    assert sorted(every) == sorted(iter_texts(spec.dataset))


def test_a_streamed_dataset_keeps_a_buffer_and_says_so(corpus, tiny_tokenizer):
    spec = section(corpus, streaming=True)
    assert shuffle_buffer_of(spec) == DEFAULT_SHUFFLE_BUFFER
    assert describe_order(shuffle_buffer_of(spec)) == "1000-document shuffle buffer"
    assert max(first_indices(spec, tiny_tokenizer)) < DEFAULT_SHUFFLE_BUFFER + HEAD  # the head only
    with pytest.raises(DatasetError, match="streamed"):
        next(permuted_texts(spec.dataset, 0))


def test_an_explicit_buffer_still_applies_and_1_keeps_the_source_order(corpus, tiny_tokenizer):
    assert first_indices(section(corpus, shuffle_buffer=1), tiny_tokenizer) == list(range(HEAD))
    assert max(first_indices(section(corpus, shuffle_buffer=100), tiny_tokenizer)) < 100 + HEAD
    assert (
        describe_order(None).startswith("full permutation per seed") and describe_order(1) == "source order"
    )


def test_seeds_and_epochs_permute_differently_and_reproducibly(corpus, tiny_tokenizer):
    spec = section(corpus)
    assert first_indices(spec, tiny_tokenizer, 1) == first_indices(spec, tiny_tokenizer, 1)
    assert first_indices(spec, tiny_tokenizer, 1) != first_indices(spec, tiny_tokenizer, 2)
    stream = training_stream(spec, tiny_tokenizer, 1)
    stream.set_epoch(1)
    assert list(stream.documents()) != list(permuted_texts(spec.dataset, 1))  # a new epoch reshuffles


def test_parent_and_training_read_one_stream_so_skip_tokens_keeps_them_disjoint(corpus, tiny_tokenizer):
    parent_tokens = 500
    pretrain, train = section(corpus), section(corpus, skip_tokens=parent_tokens, seq_len=32)
    every = [t for chunk in training_stream(pretrain, tiny_tokenizer, 3).token_chunks() for t in chunk]
    later = [t for block in training_stream(train, tiny_tokenizer, 3).blocks() for t in block]
    assert later == every[parent_tokens : parent_tokens + len(later)] and len(later) > parent_tokens


def test_a_builtin_corpus_is_permuted_by_index_like_a_dataset():
    spec = DatasetSpec(path="hfprune:pydoc_topics", split="train")
    texts = [piece for text in iter_texts(spec) for piece in pieces(text)]
    order = np.random.default_rng(4).permutation(len(texts))
    assert list(permuted_texts(spec, 4)) == [texts[i] for i in order]
    assert max(order[:HEAD]) > len(texts) * 3 // 4  # its head reaches the end of the corpus


def test_pieces_cut_at_line_ends_within_the_limit_and_keep_the_text_in_order():
    text = "\n".join(f"line {i} " + "x" * (i % 97) for i in range(2000)) + "\n" + "y" * 10_000
    found = pieces(text, 1000)
    assert all(0 < len(piece) <= 1000 for piece in found)
    assert "".join(found).replace("\n", "") == text.replace("\n", "")  # nothing lost, nothing reordered
    assert all(
        not piece.startswith("x") for piece in found[:-11]
    )  # cuts fall at line ends before the long line
    assert pieces("short document") == ["short document"]


def test_a_long_document_is_spread_over_the_whole_permutation_not_one_stretch(tmp_path):
    long_doc = "\n".join(f"long {i:05d} " + "z" * 60 for i in range(3000))  # about 50 pieces
    rows = [{"text": f"short {i}"} for i in range(500)] + [{"text": long_doc}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    order = list(permuted_texts(DatasetSpec(path="json", data_files=str(path)), seed=0))
    where = [i for i, text in enumerate(order) if text.startswith("long")]
    assert len(where) == -(-len(long_doc) // PIECE_CHARS) or len(where) > len(long_doc) // PIECE_CHARS
    # Its pieces land all over the stream, not in one consecutive run a prefix could swallow whole.
    assert where[0] < len(order) // 4 and where[-1] > 3 * len(order) // 4
    assert max(b - a for a, b in itertools.pairwise(where)) > 1
