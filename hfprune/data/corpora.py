"""The built-in corpora: text every Python interpreter ships, so recipes and tests work with no download.

`hfprune.data.texts.iter_texts` reads a dataset spec whose `path` is `hfprune:<name>` from here:

- `hfprune:pydoc_topics`: the Python documentation topics (`pydoc_data.topics`, about 0.8 MB);
  every tenth topic (sorted by name) is the `test` split.
- `hfprune:python_stdlib`: the source of the interpreter's standard library, one document per `.py`
  file (about 31 MB on CPython 3.11), in path order, exact duplicates read once. About 5% of the files,
  chosen by a hash of their text (so identical files never straddle the splits, and the split does not
  move when files are added elsewhere), are the `test` split. It is the
  pico-study's corpus: enough unique text that a parent's pretraining and a twin trained on the whole
  pipeline's budget never repeat a token, and a held-out split of whole files.

Both splits are fixed by content-independent rules, so a run's held-out text is the same on every
machine with the same interpreter version.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path


SPLITS = ("train", "test")


def pydoc_topics(split: str) -> Iterator[str]:
    from pydoc_data.topics import topics

    for i, key in enumerate(sorted(topics)):
        if (i % 10 == 9) == (split == "test"):
            yield topics[key]


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files, in path order (installed third-party packages left out)."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(text: str) -> bool:
    """Whether a document (by a hash of its text) is in the held-out `test` split."""
    return hashlib.sha256(text.encode()).digest()[0] % 20 == 0


def python_stdlib(split: str) -> Iterator[str]:
    seen: set[bytes] = set()
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        digest = hashlib.sha256(text.encode()).digest()
        if text and digest not in seen and is_held_out(text) == (split == "test"):
            yield text
        seen.add(digest)


CORPORA: dict[str, Callable[[str], Iterator[str]]] = {
    "pydoc_topics": pydoc_topics,
    "python_stdlib": python_stdlib,
}
