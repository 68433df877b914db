"""Text sources for calibration, evaluation and training: dataset specs -> texts -> token windows.

Everything that reads a corpus goes through `iter_texts`, which wraps `datasets.load_dataset`
(local `json`/`text` files work offline, `streaming` reads lazily) and adds one built-in corpus,
`hfprune:pydoc_topics`, the Python documentation shipped with every interpreter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from hfprune.errors import RunFailure



logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "hfprune:"
DOCUMENT_SEPARATOR = "\n\n"


class DatasetLike(Protocol):
    path: str
    name: str | None
    split: str
    data_files: Any
    streaming: bool
    text_field: str


class DatasetError(RunFailure, ValueError):
    """A dataset spec that cannot be read: missing files, unknown columns, too little text."""


def iter_texts(spec: DatasetLike) -> Iterator[str]:
    """Yield the documents of a dataset spec, in the dataset's order."""
    if spec.path.startswith(BUILTIN_PREFIX):
        yield from _builtin_texts(spec.path.removeprefix(BUILTIN_PREFIX), spec.split)
        return
    import datasets

    kwargs = {
        "name": spec.name,
        "split": spec.split,
        "data_files": spec.data_files,
        "streaming": spec.streaming,
    }
    try:
        dataset = datasets.load_dataset(spec.path, **{k: v for k, v in kwargs.items() if v is not None})
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise DatasetError(f"cannot load dataset {spec.path!r} (split {spec.split!r}): {err}") from err
    columns = dataset.column_names or []
    if columns and spec.text_field not in columns:
        raise DatasetError(
            f"dataset {spec.path!r} has no column {spec.text_field!r}; its columns are {', '.join(columns)} "
            "(set text_field)"
        )
    for row in dataset:
        text = row[spec.text_field]
        if text:
            yield text


def _builtin_texts(name: str, split: str) -> Iterator[str]:
    if name != "pydoc_topics":
        raise DatasetError(
            f"unknown built-in dataset {BUILTIN_PREFIX}{name}; available: {BUILTIN_PREFIX}pydoc_topics"
        )
    from pydoc_data.topics import topics

    # A fixed, content-independent split: every tenth topic (sorted by name) is held out as `test`.
    names = sorted(topics)
    if split not in {"train", "test"}:
        raise DatasetError(f"{BUILTIN_PREFIX}pydoc_topics has splits 'train' and 'test', not {split!r}")
    for i, key in enumerate(names):
        if (i % 10 == 9) == (split == "test"):
            yield topics[key]


def token_stream(spec: DatasetLike, tokenizer: Any, limit: int | None = None) -> list[int]:
    """Concatenated token ids of the documents, separated by blank lines, stopping after `limit` tokens."""
    ids: list[int] = []
    for text in iter_texts(spec):
        ids.extend(tokenizer(text + DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            return ids[:limit]
    return ids


def calibration_tokens(spec: DatasetLike, tokenizer: Any, num_samples: int, seq_len: int) -> torch.Tensor:
    """`num_samples` consecutive windows of `seq_len` tokens from the start of the corpus, shape [n, seq_len].

    Windows are taken in corpus order, as the study's calibration scripts do, so the same spec always
    gives the same tokens; too little text is an error, never a silently smaller calibration set.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (bos is not None)
    ids = token_stream(spec, tokenizer, limit=num_samples * body)
    if len(ids) < num_samples * body:
        raise DatasetError(
            f"calibration dataset {spec.path!r} has {len(ids)} tokens; {num_samples} samples x {seq_len} "
            f"tokens need {num_samples * body}: lower calibration.num_samples or calibration.seq_len"
        )
    return windows(ids, seq_len, bos, num_samples)


def windows(ids: list[int], seq_len: int, bos: int | None, count: int | None = None) -> torch.Tensor:
    """Non-overlapping `seq_len` windows over `ids`, each opened by `bos` when the tokenizer has one.

    A BOS at every window start matches how the model saw documents in pretraining; without it the
    first positions of each window (the attention sink) behave unlike real inputs.
    """
    body = seq_len - (bos is not None)
    available = len(ids) // body
    count = available if count is None else min(count, available)
    chunks = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if bos is not None:
        chunks = torch.cat([torch.full((count, 1), bos, dtype=torch.long), chunks], dim=1)
    return chunks
