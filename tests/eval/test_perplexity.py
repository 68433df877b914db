"""Evaluation windows that represent the whole evaluation text: spread when capped, coverage recorded."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hfprune.data.texts import (
    STREAMED_READ_MULTIPLE,
    document_tokens,
    documents_covered,
    spread_windows,
    token_stream,
    windows,
)
from hfprune.eval.perplexity import evaluation_windows, perplexity
from hfprune.publish.results import coverage, eval_results, result_rows, split_of
from hfprune.recipe.base import DatasetSpec
from hfprune.report.writer import describe_protocol


SEQ = 32
HEAD_DOCUMENTS, DOCUMENTS = 10, 100


class RepeatModel(torch.nn.Module):
    """Predicts that every token repeats the one before it: text of one repeated letter costs almost
    nothing, varied text a lot, so a window's NLL says which part of the corpus it came from."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=10.0 * torch.nn.functional.one_hot(input_ids, self.vocab_size).float())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A set whose head (its first documents, one repeated letter) is unlike the rest (varied words)."""
    path = tmp_path_factory.mktemp("eval") / "set.jsonl"
    head = ["a" * 300 for _ in range(HEAD_DOCUMENTS)]
    rest = [
        " ".join(f"w{(i * 7 + j * 13) % 97}" for j in range(60)) for i in range(DOCUMENTS - HEAD_DOCUMENTS)
    ]
    path.write_text("\n".join(json.dumps({"text": text}) for text in head + rest) + "\n")
    return path


def spec_of(corpus: Path, streaming: bool = False) -> DatasetSpec:
    return DatasetSpec(path="json", data_files=str(corpus), streaming=streaming)


def test_spread_indices_reach_from_the_first_window_to_the_last():
    assert spread_windows(10, 4) == [0, 3, 6, 9]
    assert spread_windows(10, None) == list(range(10)) == spread_windows(10, 10) == spread_windows(10, 50)
    assert spread_windows(10, 1) == [0] and spread_windows(0, 3) == []


def test_documents_covered_counts_each_document_a_span_touches():
    starts, total = [0, 5, 10, 30], 40  # four documents: [0, 5), [5, 10), [10, 30), [30, 40)
    assert documents_covered(starts, total, [(0, 4)]) == 1
    assert documents_covered(starts, total, [(4, 6), (29, 31)]) == 4
    assert documents_covered(starts, total, [(12, 20), (20, 28)]) == 1  # one document counted once


def test_capped_windows_represent_the_whole_set_not_its_head(corpus, tiny_tokenizer):
    spec, model = spec_of(corpus), RepeatModel(len(tiny_tokenizer))
    whole, has_bos, _ = evaluation_windows(spec, tiny_tokenizer, SEQ, None)
    capped, _, capped_selection = evaluation_windows(spec, tiny_tokenizer, SEQ, 8)
    ids = token_stream(spec, tiny_tokenizer)
    head = windows(ids, SEQ, tiny_tokenizer.bos_token_id, 8)  # what a cap used to take
    assert capped.shape == head.shape == (8, SEQ) and whole.shape[0] > 8
    assert torch.equal(capped[0], whole[0]) and torch.equal(capped[-1], whole[-1])  # first and last window
    nll = {
        name: perplexity(model, batch, has_bos, {}).nll
        for name, batch in [("whole", whole), ("capped", capped), ("head", head)]
    }
    # The head is the cheap letters only; the spread windows score like the whole set.
    assert nll["head"] < 0.1 * nll["whole"]
    assert abs(nll["capped"] - nll["whole"]) < 0.25 * nll["whole"]
    protocol = perplexity(model, capped, has_bos, {}, selection=capped_selection).to_dict()["protocol"]
    assert protocol["window_selection"] == "spread" and protocol["read_limit"] is None
    assert protocol["documents_total"] == DOCUMENTS and protocol["tokens_read"] == len(ids)
    body = SEQ - 1
    head_spans = [(i * body, (i + 1) * body) for i in range(8)]
    head_covered = documents_covered(document_tokens(spec, tiny_tokenizer)[1], len(ids), head_spans)
    assert protocol["documents_covered"] >= 8 > head_covered  # one document per window, not the first few
    first_window_only = perplexity(model, head, has_bos, {}).to_dict()["protocol"]
    assert first_window_only["window_selection"] is None  # windows given without a selection record none


def test_an_uncapped_set_is_read_as_before_and_says_so(corpus, tiny_tokenizer):
    spec = spec_of(corpus)
    batch, _, selection = evaluation_windows(spec, tiny_tokenizer, SEQ, None)
    assert torch.equal(batch, windows(token_stream(spec, tiny_tokenizer), SEQ, tiny_tokenizer.bos_token_id))
    assert selection.window_selection == "all"
    assert selection.documents_covered == selection.documents_total == DOCUMENTS


def test_a_streamed_set_reads_a_bounded_stated_amount_and_spreads_within_it(corpus, tiny_tokenizer):
    batch, _, selection = evaluation_windows(spec_of(corpus, streaming=True), tiny_tokenizer, SEQ, 2)
    assert selection.read_limit == STREAMED_READ_MULTIPLE * 2 * (SEQ - 1) == selection.tokens_read
    assert selection.window_selection == "spread" and batch.shape == (2, SEQ)
    assert selection.documents_total < DOCUMENTS  # only the part read is counted
    assert "the first 496 tokens" in coverage(
        perplexity(RepeatModel(len(tiny_tokenizer)), batch, True, {}, selection=selection).to_dict()[
            "protocol"
        ]
    )


PROTOCOL = {
    "dataset": {"path": "json", "data_files": "shakespeare/test.jsonl", "split": "train"},
    "seq_len": 256,
    "windows": 8,
    "tokens": 2040,
    "bos": True,
    "window_selection": "spread",
    "documents_covered": 8,
    "documents_total": 1,
}


def test_cards_name_a_held_out_local_file_by_its_role_and_show_its_coverage():
    protocol = {**PROTOCOL, "documents_total": 120}
    scores = {"perplexity": {"hamlet": {"value": 30.0, "protocol": protocol}}}
    assert [r.dataset_split for r in eval_results(scores)] == ["test"]  # not the loader's default `train`
    assert [r.dataset_split for r in eval_results(scores, frozenset({"hamlet"}))] == ["train"]  # not held out
    hub = {**protocol, "dataset": {"path": "Salesforce/wikitext", "split": "validation"}}
    assert (
        split_of(hub) == "validation" and split_of({"dataset": {"path": "hfprune:pydoc_topics"}}) == "train"
    )
    rows = result_rows({"parent": {"params": {"total": 1}, "perplexity": scores["perplexity"]}}, ["parent"])
    assert rows[1]["protocol"] == "test split, 8 x 256 tokens, spread over 8 of 120 documents"
    assert coverage({**protocol, "documents_total": None}) is None  # recorded before coverage was


def test_the_report_protocol_line_shows_the_coverage():
    line = describe_protocol({**PROTOCOL, "documents_total": 120})
    assert line.endswith("BOS prepended, spread over 8 of 120 documents")
    streamed = describe_protocol({**PROTOCOL, "read_limit": 4096})
    assert "8 of 1 documents of the first 4,096 tokens read" in streamed
    assert "documents" not in describe_protocol({k: v for k, v in PROTOCOL.items() if "documents" not in k})
