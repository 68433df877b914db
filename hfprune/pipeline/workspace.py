"""The output folder of one run, as the stages see it: its paths, its metrics store and its stage ledger.

Every stage of `hfprune.pipeline.stages` reads and writes through a `Workspace`, never through paths of its own:

- `models/<kind>/` for each model kind with a folder (`hfprune.kinds`);
- `metrics.json`, changed only through `MetricsStore.update` (one read-modify-write, written atomically);
- `recipe.yaml`, the resolved recipe;
- `.hfprune/stages.json`, the ledger of finished stages and their input fingerprints;
- `.hfprune/train/<kind>/`, the checkpoints of a training stage until its model is published.

Opening a workspace creates nothing: a run that fails before its first stage leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hfprune import distributed, kinds
from hfprune.outputs import (
    StageLedger,
    output_lock,
    read_json,
    remove_stale_temporaries,
    write_json,
    write_text,
)


MASKS_FILE = "sparsity_masks.safetensors"


class MetricsStore:
    """`metrics.json`: one entry per model kind, `{"parent": {...}, "pruned": {...}, ...}`.

    `update` is the only way to change it, so every writer merges into what is on disk at that moment
    rather than into a copy read earlier; the file is replaced in one rename, so readers never see half
    of it. Only the main process writes (see `hfprune.pipeline.runner`).
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        return read_json(self.path, {})

    def get(self, kind: str) -> dict[str, Any]:
        return self.read().get(kind, {})

    def update(
        self, kind: str, *, replace: bool = False, drop: Iterable[str] = (), **fields: Any
    ) -> dict[str, Any]:
        """Merge `fields` into `kind`'s entry (or, with `replace`, make them the whole entry), remove the
        `drop` fields, and write the file atomically; returns the new entry."""
        with self._lock:
            metrics = self.read()
            entry = dict(fields) if replace else {**metrics.get(kind, {}), **fields}
            for name in drop:
                entry.pop(name, None)
            metrics[kind] = entry
            write_json(self.path, metrics)
            return entry

    def scores_hash(self) -> str:
        """A hash of the scores without the push records, which describe the published cards, not their
        content ("none" before any score): cards are stale exactly when it changes."""
        metrics = read_json(self.path, None)
        if metrics is None:
            return "none"
        scores = {k: {f: v for f, v in entry.items() if f != "hub"} for k, entry in metrics.items()}
        return hashlib.sha256(json.dumps(scores, sort_keys=True).encode()).hexdigest()[:12]


class Workspace:
    """The paths of one output folder, its metrics store and its stage ledger."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.metrics = MetricsStore(self.root / "metrics.json")
        self.ledger = StageLedger(self.root)

    @contextlib.contextmanager
    def session(self) -> Iterator[Workspace]:
        """Where a run starts and ends: every run (single, sweep cell, `hfprune push`) opens its folder here.

        The folder's lock (`output_lock`) is held until the run ends, so a second run on it fails at once
        naming this one; holding it, the main process removes what a killed run left half-written (no
        other process can be writing them). Under torchrun only the main process locks and cleans; the
        others meet it at the pipeline's first barrier. Opening creates nothing that outlives a run that
        wrote nothing, so a run that fails before its first stage leaves no folder behind.
        """
        with output_lock(self.root):
            if distributed.is_main_process() and self.root.is_dir():
                remove_stale_temporaries(self.root)
            self.ledger.reload()
            yield self

    # -- paths ---------------------------------------------------------------------------------
    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_dir(self, kind: str) -> Path:
        folder = kinds.get(kind).folder
        if folder is None:
            raise ValueError(f"model kind {kind!r} has no folder in the output")
        return self.models / folder

    @property
    def pruned_dir(self) -> Path:
        return self.model_dir(kinds.PRUNED.name)

    @property
    def masks_path(self) -> Path:
        return self.pruned_dir / MASKS_FILE

    def train_dir(self, kind: str) -> Path:
        return self.root / ".hfprune" / "train" / kind

    def has_model(self, kind: str) -> bool:
        """A kind's folder holds a saved model."""
        return kinds.get(kind).folder is not None and (self.model_dir(kind) / "config.json").is_file()

    def saved_kinds(self, *, carded: bool = False) -> list[str]:
        """The kinds with a saved model (with `carded`, only those that get a model card), in registry order."""
        candidates = kinds.carded() if carded else kinds.all_kinds()
        return [kind.name for kind in candidates if self.has_model(kind.name)]

    # -- writes --------------------------------------------------------------------------------
    def write_recipe(self, text: str) -> None:
        write_text(self.recipe_path, text)
