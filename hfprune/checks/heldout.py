"""Held-out checks: does an evaluation set read text that calibration or training also reads?

Runs on a validated recipe, before any work: `hfprune validate` and the start of `hfprune run` call
`overlap_problems(recipe)` and report what it returns, (key path, message) pairs like `RecipeError`'s.
The cards ask `overlapping_sets(recipe)` which sets are not held out, to name the role of their text.
It reads no data (it must work offline and in a dry run); it compares what the recipe declares:

- the same corpus: dataset `path` (with a few Hub aliases such as `wikitext` for `Salesforce/wikitext`),
  config `name` and `split`; when both sides name `data_files`, the files themselves (a local
  `json`/`text` corpus is its files, whatever its split is called); a side without `data_files` reads
  every file of its split, so it overlaps a file whose name carries that split (`c4-train.00000...`);
- known containments: a few corpora contain others (WikiText-103 holds WikiText-2's train split and the
  same validation and test articles), listed in `_FAMILIES`;
- declared offsets: calibration reads its corpus in order from its start (plus a `skip_tokens` where
  the spec has one); evaluation spreads its windows over the whole set, or over the first
  `STREAMED_READ_MULTIPLE` x `max_windows` windows of a streamed one (`hfprune.eval.perplexity`);
  training reads a shuffled stream (a full permutation, or a buffer for a streamed dataset), so its
  `skip_tokens` only makes it disjoint from the start of the corpus when `shuffle_buffer` is 1 (source order). Token
  offsets are compared with a margin (`OFFSET_MARGIN`), because evaluation and calibration separate
  documents with a blank line and training with EOS, so the same position can differ by a token per
  document.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any


# Hub ids that resolve to the same dataset repository.
_ALIASES = {"wikitext": "salesforce/wikitext", "c4": "allenai/c4"}

# Configs of one repository whose text overlaps for the same split: WikiText-2's articles are a subset
# of WikiText-103's (train) and both share the validation and test articles; the raw and tokenized
# variants are the same text. C4's `en.noblocklist` is `en` plus the documents the blocklist removed.
_FAMILIES: dict[str, tuple[frozenset[str], ...]] = {
    "salesforce/wikitext": (
        frozenset({"wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1"}),
    ),
    "allenai/c4": (frozenset({"en", "en.noblocklist"}),),
}

# Builders whose text is entirely their data files: the config name and split label say nothing.
_FILE_BUILDERS = {"json", "text", "csv", "parquet", "arrow"}

# Two token ranges of the same corpus count as disjoint only with this relative gap between them.
OFFSET_MARGIN = 0.05

# The split an evaluation set should read when the recipe names none: the corpus's held-out split.
HELD_OUT_SPLITS = {
    "salesforce/wikitext": "test",
    "allenai/c4": "validation",
    "hfprune:pydoc_topics": "test",
    "hfprune:python_stdlib": "test",
}


@dataclass(frozen=True)
class _Read:
    """The part of a corpus one section reads: which text, and which token range of it in corpus order."""

    key: str  # key path of the dataset spec in the recipe
    role: str  # "evaluation set 'x'", "calibration data", "training data"
    spec: Any  # a DatasetSpec
    start: int
    stop: int | None  # None: to the end of the corpus

    def describe(self) -> str:
        spec = self.spec
        parts = [spec.path, spec.name or "", f"split {spec.split}"]
        files = _files(spec)
        if files:
            parts.append("files " + ", ".join(sorted(files)))
        return " ".join(p for p in parts if p)


def overlap_problems(recipe: Any) -> list[tuple[str, str]]:
    """(key path, message) for every evaluation set that reads calibration or training text.

    Quiet for a recipe whose evaluation text is held out by split, by files or by declared offsets.
    """
    sources = [_calibration_read(recipe.calibration)]
    if recipe.train is not None:
        sources.append(_training_read(recipe.train))
    if recipe.parent.pretrain is not None:  # a parent pretrained here was trained on that text too
        pretraining = _training_read(recipe.parent.pretrain)
        sources.append(replace(pretraining, key="parent.pretrain.dataset", role="pretraining data"))
    problems = []
    for index, spec in enumerate(recipe.eval.perplexity):
        read = _evaluation_read(index, spec)
        for source in sources:
            why = _overlap(read, source)
            if why:
                problems.append((read.key, _message(read, source, why)))
    return problems


def overlapping_sets(recipe: Any) -> frozenset[str]:
    """The names of the evaluation sets that read calibration or training text (`overlap_problems`):
    the cards publish their scores as measured on a `train` split (`hfprune.publish.results`)."""
    flagged = {key for key, _ in overlap_problems(recipe)}
    sets = enumerate(recipe.eval.perplexity)
    return frozenset(spec.name for i, spec in sets if f"eval.perplexity.{i}.dataset" in flagged)


def held_out_split(path: str, data_files: Any = None) -> str | None:
    """The split an evaluation set of dataset `path` defaults to: its held-out split where one is known.

    Files (`data_files`) are their own text whatever their split label, so they keep the loader's
    default ("train"); None means no held-out split is known and the recipe must name one.
    """
    if data_files is not None:
        return "train"
    return HELD_OUT_SPLITS.get(_path(path))


def _calibration_read(calibration: Any) -> _Read:
    start = getattr(calibration, "skip_tokens", 0) or 0
    length = calibration.num_samples * (calibration.seq_len - 1)
    return _Read("calibration.dataset", "calibration data", calibration.dataset, start, start + length)


def _training_read(train: Any) -> _Read:
    # A shuffle buffer larger than one document can emit any document after the skipped tokens.
    start = train.skip_tokens if train.shuffle_buffer == 1 else 0
    return _Read("train.dataset", "training data", train.dataset, start, None)


def _evaluation_read(index: int, spec: Any) -> _Read:
    from hfprune.data.texts import STREAMED_READ_MULTIPLE

    start = getattr(spec, "skip_tokens", 0) or 0
    # Capped windows are spread over the whole set; only a streamed set's read is bounded.
    bounded = spec.max_windows is not None and spec.dataset.streaming
    read = STREAMED_READ_MULTIPLE * (spec.max_windows or 0) * (spec.seq_len - 1)
    stop = start + read if bounded else None
    return _Read(
        f"eval.perplexity.{index}.dataset", f"evaluation set {spec.name!r}", spec.dataset, start, stop
    )


def _overlap(a: _Read, b: _Read) -> str | None:
    """Why `a` and `b` read the same text, or None when they do not."""
    why = _same_text(a.spec, b.spec)
    if why is None or _ranges_disjoint(a, b):
        return None
    return why


def _same_text(a: Any, b: Any) -> str | None:
    path_a, path_b = _path(a.path), _path(b.path)
    if path_a != path_b:
        return None
    files_a, files_b = _files(a), _files(b)
    if path_a in _FILE_BUILDERS or (files_a and files_b):
        shared = files_a & files_b
        return f"both read {', '.join(sorted(shared))}" if shared else None
    if files_a or files_b:
        files, split = (files_a, b.split) if files_a else (files_b, a.split)
        named = [f for f in files if re.search(rf"(^|[^a-z]){re.escape(split.lower())}([^a-z]|$)", f.lower())]
        return f"{', '.join(sorted(named))} is part of the {split!r} split" if named else None
    if a.split != b.split:
        return None
    if a.name == b.name:
        return f"the same dataset and split ({a.split})"
    for family in _FAMILIES.get(path_a, ()):
        if a.name in family and b.name in family:
            return f"{a.name} and {b.name} share their {a.split!r} text"
    return None


def _ranges_disjoint(a: _Read, b: _Read) -> bool:
    first, second = (a, b) if a.start <= b.start else (b, a)
    if first.stop is None:
        return False
    return second.start >= first.stop * (1 + OFFSET_MARGIN)


def _path(path: str) -> str:
    lowered = path.lower()
    return _ALIASES.get(lowered, lowered)


def _files(spec: Any) -> frozenset[str]:
    """The data files a spec reads, normalised; for a {split: files} mapping, those of its split."""
    files = spec.data_files
    if isinstance(files, dict):
        files = files.get(spec.split)
    if files is None:
        return frozenset()
    names = [files] if isinstance(files, str) else list(files)
    return frozenset(os.path.normpath(name) for name in names)


def _message(read: _Read, source: _Read, why: str) -> str:
    return (
        f"{read.role} ({read.describe()}) overlaps the {source.role} ({source.describe()}): {why}; "
        "evaluate on a held-out split (e.g. split: test or validation) or other files, so that the "
        "perplexity is not measured on text the model was calibrated or trained on"
    )
