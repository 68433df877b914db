"""Text sources for calibration, evaluation and training: dataset specs -> texts -> token windows.

Everything that reads a corpus goes through `iter_texts`, which wraps `datasets.load_dataset`
(local `json`/`text` files work offline, `streaming` reads lazily) and adds the built-in corpora of
`hfprune.data.corpora` (`hfprune:pydoc_topics`, `hfprune:python_stdlib`), text shipped with every interpreter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
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
    """Yield the documents of a dataset spec, in the dataset's order.

    A file that is missing, empty, not in its format or without the text field is a `DatasetError`
    naming it, raised when it is opened or, for a streamed dataset, when the bad record is reached.
    """
    if spec.path.startswith(BUILTIN_PREFIX):
        yield from _builtin_texts(spec.path.removeprefix(BUILTIN_PREFIX), spec.split)
        return
    from datasets.exceptions import DatasetsError

    dataset = _load_dataset(spec)
    columns = dataset.column_names or []
    if columns and spec.text_field not in columns:
        raise DatasetError(
            f"dataset {_where(spec)} has no column {spec.text_field!r}; its columns are {', '.join(columns)} "
            "(set text_field)"
        )
    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (OSError, ValueError, DatasetsError) as err:  # a streamed file that turns bad midway
            raise DatasetError(f"cannot read dataset {_where(spec)}: {_root_cause(err)}") from err
        text = row[spec.text_field]
        if text is not None and not isinstance(text, str):
            raise DatasetError(
                f"dataset {_where(spec)}: field {spec.text_field!r} holds {type(text).__name__} values, not text "
                "(set text_field to a text column)"
            )
        if text:
            yield text


def _load_dataset(spec: DatasetLike) -> Any:
    import datasets
    from datasets.exceptions import DatasetsError

    for file in _local_files(spec.data_files):
        if file.stat().st_size == 0:
            raise DatasetError(
                f"dataset file {file} is empty: give it records with a {spec.text_field!r} field"
            )
    kwargs = {
        "name": spec.name,
        "split": spec.split,
        "data_files": spec.data_files,
        "streaming": spec.streaming,
    }
    try:
        return datasets.load_dataset(spec.path, **{k: v for k, v in kwargs.items() if v is not None})
    except (OSError, ValueError, RuntimeError, DatasetsError) as err:
        # datasets wraps the reader's error (say, a JSON parse error and its row): report that one.
        raise DatasetError(
            f"cannot load dataset {_where(spec)} (split {spec.split!r}): {_root_cause(err)}"
        ) from err


def _local_files(data_files: Any) -> list[Path]:
    """The local files among `data_files` (a path, a list of them, or a mapping of split to either)."""
    if data_files is None:
        return []
    if isinstance(data_files, (str, Path)):
        data_files = [data_files]
    elif isinstance(data_files, dict):
        data_files = [f for v in data_files.values() for f in ([v] if isinstance(v, (str, Path)) else v)]
    return [Path(f).expanduser() for f in data_files if Path(f).expanduser().is_file()]


def _where(spec: DatasetLike) -> str:
    files = spec.data_files
    if isinstance(files, dict):
        files = [f for v in files.values() for f in ([v] if isinstance(v, (str, Path)) else v)]
    if isinstance(files, (list, tuple)):
        files = ", ".join(str(f) for f in files)
    return f"{spec.path!r} ({files})" if files else repr(spec.path)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _builtin_texts(name: str, split: str) -> Iterator[str]:
    from hfprune.data.corpora import CORPORA, SPLITS

    if name not in CORPORA:
        known = ", ".join(BUILTIN_PREFIX + n for n in CORPORA)
        raise DatasetError(f"unknown built-in dataset {BUILTIN_PREFIX}{name}; available: {known}")
    if split not in SPLITS:
        raise DatasetError(f"{BUILTIN_PREFIX}{name} has splits 'train' and 'test', not {split!r}")
    yield from CORPORA[name](split)


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
