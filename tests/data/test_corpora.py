"""The built-in corpora (`hfprune.data.corpora`): fixed, disjoint splits, read through `iter_texts`."""

from __future__ import annotations

import pytest

from hfprune.checks.heldout import held_out_split
from hfprune.data.corpora import is_held_out, stdlib_files
from hfprune.data.texts import DatasetError, iter_texts
from hfprune.recipe.base import DatasetSpec


def _texts(split: str) -> list[str]:
    return list(iter_texts(DatasetSpec(path="hfprune:python_stdlib", split=split)))


def test_stdlib_splits_are_disjoint_whole_files_and_the_test_split_is_small():
    train, test = _texts("train"), _texts("test")
    assert set(train).isdisjoint(test) and len(set(train)) == len(train)  # no text in both, none twice
    assert 0.02 < len(test) / (len(train) + len(test)) < 0.1
    assert sum(map(len, train)) > 10_000_000  # the pico-study's parent and twins never repeat a token


def test_stdlib_files_are_in_path_order_without_third_party_packages(tmp_path):
    for name in ("a.py", "pkg/b.py", "pkg/sub/c.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "d.py").write_text("y = 2\n")
    files = [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path)]
    assert files == ["a.py", "pkg/b.py", "pkg/sub/c.py"]
    held = [i for i in range(2000) if is_held_out(f"x = {i}\n")]
    assert 60 < len(held) < 140  # about one document in twenty
    assert held == [i for i in range(2000) if is_held_out(f"x = {i}\n")]  # by content alone


def test_unknown_corpus_and_split_name_what_exists():
    with pytest.raises(DatasetError, match="hfprune:pydoc_topics, hfprune:python_stdlib"):
        list(iter_texts(DatasetSpec(path="hfprune:nope")))
    with pytest.raises(DatasetError, match="splits 'train' and 'test'"):
        list(iter_texts(DatasetSpec(path="hfprune:python_stdlib", split="validation")))


def test_the_stdlib_test_split_counts_as_held_out():
    assert held_out_split("hfprune:python_stdlib") == "test"
