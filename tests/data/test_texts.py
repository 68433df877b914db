"""Dataset specs to texts and token windows: built-in corpus, local files offline, clear errors."""

from __future__ import annotations

import json

import pytest

from hfprune.data.texts import DatasetError, calibration_tokens, iter_texts, windows
from hfprune.recipe.base import DatasetSpec


def test_builtin_pydoc_splits_are_disjoint_and_complete():
    from pydoc_data.topics import topics

    train = list(iter_texts(DatasetSpec(path="hfprune:pydoc_topics", split="train")))
    test = list(iter_texts(DatasetSpec(path="hfprune:pydoc_topics", split="test")))
    assert len(train) + len(test) == len(topics)
    assert not set(train) & set(test)
    with pytest.raises(DatasetError, match="splits 'train' and 'test'"):
        list(iter_texts(DatasetSpec(path="hfprune:pydoc_topics", split="validation")))


def test_local_json_and_text_files(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": f"document {i}"}) for i in range(3)))
    assert list(iter_texts(DatasetSpec(path="json", data_files=str(rows), text_field="body"))) == [
        "document 0",
        "document 1",
        "document 2",
    ]
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\nsecond line\n")
    assert list(iter_texts(DatasetSpec(path="text", data_files=str(lines), streaming=True))) == [
        "first line",
        "second line",
    ]


def test_wrong_text_field_names_the_columns(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "x", "id": 1}))
    with pytest.raises(DatasetError, match="no column 'text'.*body, id"):
        list(iter_texts(DatasetSpec(path="json", data_files=str(rows))))


def test_missing_local_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="cannot load dataset"):
        list(iter_texts(DatasetSpec(path="json", data_files=str(tmp_path / "absent.jsonl"))))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", "", "is empty"),
        ("broken.jsonl", '{"text": "fine"}\nnot json at all\n', "JSON parse error"),
        ("numbers.jsonl", '{"text": 1}\n{"text": 2}\n', "holds int values, not text"),
        ("latin1.txt", b"caf\xe9\n", "can't decode byte 0xe9"),
    ],
)
def test_unreadable_files_are_dataset_errors_naming_the_file(tmp_path, name, content, expected, streaming):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    spec = DatasetSpec(
        path=path.suffix.lstrip(".").replace("jsonl", "json").replace("txt", "text"),
        data_files=str(path),
        streaming=streaming,
    )
    with pytest.raises(DatasetError, match=expected) as caught:
        list(iter_texts(spec))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_windows_open_with_bos():
    batch = windows(list(range(10, 30)), seq_len=5, bos=1)
    assert batch.shape == (5, 5)
    assert batch[:, 0].tolist() == [1] * 5
    assert batch[0, 1:].tolist() == [10, 11, 12, 13] and batch[1, 1:].tolist() == [14, 15, 16, 17]
    assert windows(list(range(10)), seq_len=4, bos=None, count=2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_calibration_tokens_shape_and_too_little_text(tiny_tokenizer):
    spec = DatasetSpec(path="hfprune:pydoc_topics")
    ids = calibration_tokens(spec, tiny_tokenizer, num_samples=3, seq_len=16)
    assert ids.shape == (3, 16) and (ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    with pytest.raises(DatasetError, match="lower calibration.num_samples"):
        calibration_tokens(spec, tiny_tokenizer, num_samples=10**6, seq_len=512)
