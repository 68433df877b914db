"""Datasets of the packaged lm-eval tasks (`hfprune_mc`, `hfprune_text`), built from local files only.

lm-eval calls these through `custom_dataset: !function tasks.<name>` in the task YAMLs beside this
file, so the tasks need no absolute paths and no download, wherever hfprune is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


HERE = Path(__file__).parent


def multiple_choice(**_metadata: Any) -> dict[str, Any]:
    """`hfprune_mc`: the questions in mc.jsonl ({"question", "choices", "label"} per line)."""
    import datasets

    rows = [json.loads(line) for line in (HERE / "mc.jsonl").read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def pydoc_text(**_metadata: Any) -> dict[str, Any]:
    """`hfprune_text`: the held-out Python documentation topics, one document each."""
    import datasets

    from hfprune.data.texts import iter_texts
    from hfprune.recipe.base import DatasetSpec

    texts = list(iter_texts(DatasetSpec(path="hfprune:pydoc_topics", split="test")))
    return {"test": datasets.Dataset.from_list([{"text": text} for text in texts])}
