"""Text sources for calibration, evaluation and training: dataset specs -> texts -> token windows.

Everything that reads a corpus goes through `iter_texts`, which wraps `datasets.load_dataset`
(local `json`/`text` files work offline, `streaming` reads lazily) and adds the built-in corpora of
`hfprune.data.corpora` (`hfprune:pydoc_topics`, `hfprune:python_stdlib`), text shipped with every interpreter.
`permuted_texts` reads a dataset that is not streamed in a full random permutation of its documents, cut
into pieces of at most `PIECE_CHARS` characters (training, `hfprune.training.packing`), so that any prefix
of it is a fair sample of the whole corpus.

Token windows: calibration takes consecutive windows from the start (`calibration_tokens`); evaluation
(`hfprune.eval.perplexity`) tokenizes the whole set with its document boundaries (`document_tokens`) and,
when `max_windows` caps it, takes windows spread evenly over all of it (`spread_windows`): a streamed set
is read up to `STREAMED_READ_MULTIPLE` x `max_windows` windows first and the windows spread over that.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hfprune.errors import RunFailure


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "hfprune:"
DOCUMENT_SEPARATOR = "\n\n"
# A streamed evaluation set capped at k windows is read up to this many times k windows' tokens, and the
# k windows spread over that: a bounded read (a stream may be endless) that still reaches past its head.
STREAMED_READ_MULTIPLE = 8


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
    yield from _rows(spec, _text_dataset(spec))


# Documents are permuted in pieces of at most this many characters (cut at line ends): a corpus's few
# very long documents (the standard library holds 300-750 kB files, a tenth of a pico parent's tokens
# each) would otherwise fill whole stretches of training, the decay phase included, and make a model's
# score depend on where its seed happened to put them.
PIECE_CHARS = 4096


def pieces(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` cut at line ends into consecutive pieces of at most `limit` characters, in order (a longer
    line is cut where the limit falls); blank pieces are dropped."""
    found: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.split("\n"):
        while len(line) > limit:
            found += ["\n".join(current)] if current else []
            current, size = [], 0
            found.append(line[:limit])
            line = line[limit:]
        if current and size + 1 + len(line) > limit:
            found.append("\n".join(current))
            current, size = [], 0
        size += len(line) + (1 if current else 0)
        current.append(line)
    if current:
        found.append("\n".join(current))
    return [piece for piece in found if piece.strip()]


def permuted_texts(spec: DatasetLike, seed: int) -> Iterator[str]:
    """The documents of a dataset that is not streamed, cut into `pieces` and read in a full random
    permutation of the pieces by `seed`.

    `datasets.Dataset.shuffle(seed=seed)` (numpy's `default_rng(seed).permutation` of the row indices) of
    the dataset's rows mapped to their pieces; the built-in corpora get the same permutation of their
    pieces. Unlike a shuffle buffer, the first pieces come from the whole corpus, so any prefix is a fair
    sample of it; a document shorter than `PIECE_CHARS` is one piece. A streamed dataset has no length to
    permute: it is a `DatasetError` (`hfprune.training.packing` uses a buffer for those).
    """
    if spec.streaming:
        raise DatasetError(f"dataset {_where(spec)} is streamed: it cannot be permuted as a whole")
    seed %= 1 << 64  # numpy seeds are non-negative; a recipe's seed may not be, and others stay as they are
    if spec.path.startswith(BUILTIN_PREFIX):
        import numpy as np

        texts = [
            p
            for text in _builtin_texts(spec.path.removeprefix(BUILTIN_PREFIX), spec.split)
            for p in pieces(text)
        ]
        for index in np.random.default_rng(seed).permutation(len(texts)):
            yield texts[index]
        return
    dataset = _text_dataset(spec)
    field = spec.text_field

    def cut(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
        return {field: [p for text in batch[field] if isinstance(text, str) for p in pieces(text)]}

    # In memory: the pieces and the permutation are index mappings, not cache files beside the dataset's.
    cut_rows = dataset.map(cut, batched=True, remove_columns=dataset.column_names, keep_in_memory=True)
    yield from _rows(spec, cut_rows.shuffle(seed=seed, keep_in_memory=True))


def _text_dataset(spec: DatasetLike) -> Any:
    """The loaded dataset, checked to have the text column."""
    dataset = _load_dataset(spec)
    columns = dataset.column_names or []
    if columns and spec.text_field not in columns:
        raise DatasetError(
            f"dataset {_where(spec)} has no column {spec.text_field!r}; its columns are {', '.join(columns)} "
            "(set text_field)"
        )
    return dataset


def _rows(spec: DatasetLike, dataset: Any) -> Iterator[str]:
    """The non-empty texts of `dataset`'s rows, in its order; bad records are `DatasetError`s."""
    from datasets.exceptions import DatasetsError

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
    return document_tokens(spec, tokenizer, limit)[0]


def document_tokens(
    spec: DatasetLike, tokenizer: Any, limit: int | None = None
) -> tuple[list[int], list[int]]:
    """`token_stream`'s ids, and the offset in them where each document starts (its blank line is its own).

    The boundaries are what lets evaluation count the documents its windows cover.
    """
    ids: list[int] = []
    starts: list[int] = []
    for text in iter_texts(spec):
        starts.append(len(ids))
        ids.extend(tokenizer(text + DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            return ids[:limit], starts
    return ids, starts


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
    import torch  # here, not at the top: the held-out check reads this module's constants without torch

    body = seq_len - (bos is not None)
    available = len(ids) // body
    count = available if count is None else min(count, available)
    chunks = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if bos is not None:
        chunks = torch.cat([torch.full((count, 1), bos, dtype=torch.long), chunks], dim=1)
    return chunks


def spread_windows(available: int, count: int | None) -> list[int]:
    """Which of `available` non-overlapping windows to take: all of them when `count` is None or not
    smaller, else `count` of them evenly spaced from the first to the last (window i of count k is
    floor(i (n - 1) / (k - 1))), so a capped set represents its whole text, not its head."""
    if count is None or count >= available:
        return list(range(available))
    if count == 1:
        return [0]
    return [i * (available - 1) // (count - 1) for i in range(count)]


def documents_covered(starts: list[int], total: int, spans: list[tuple[int, int]]) -> int:
    """How many documents (starting at `starts` in a stream of `total` tokens) the token ranges
    `spans` ([start, stop)) touch."""
    ends = [*starts[1:], total]
    touched = set()
    for first, stop in spans:
        # The documents that start before `stop` and end after `first`.
        low = bisect.bisect_right(ends, first)
        high = bisect.bisect_left(starts, stop)
        touched.update(range(low, high))
    return len(touched)
