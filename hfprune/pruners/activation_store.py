"""Hidden states of every calibration batch at one depth of the sequential walk, within a byte budget.

Sits under `hfprune.pruners.calibration.LayerWalk` (the sparse pruners' layer-by-layer walk). The first batches,
as many as fit in the budget, stay in memory on the device the layers run on; the rest are spilled to
files in a temporary folder (under $TMPDIR) and read back one batch at a time. A layer's outputs replace
its inputs batch by batch, so what is held never exceeds the budget plus the one batch in flight (its
input read back and its output). Writing and reading a tensor through a file is exact, so where a batch
lives never changes the pruning.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch


logger = logging.getLogger(__name__)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


class Spilled:
    """One batch's hidden states in a file; the file goes when nothing refers to this handle any more."""

    def __init__(self, path: Path, tensor: torch.Tensor) -> None:
        self.path, self.nbytes = path, tensor.numel() * tensor.element_size()
        torch.save(tensor.detach().to("cpu"), path)
        weakref.finalize(self, _unlink, path)

    def load(self, device: torch.device) -> torch.Tensor:
        return torch.load(self.path, map_location=device, weights_only=True)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


class ActivationStore:
    """Per-batch hidden states: in memory up to `budget` bytes (None: no limit), spilled to files beyond.

    Which batches are held is decided as they are appended (the first that fit); a replacement has the
    same shape, so a held batch stays held and a spilled one stays spilled.
    """

    def __init__(self, budget: int | None, device: torch.device, label: str = "calibration") -> None:
        self.budget, self.device, self.label = budget, device, label
        self.entries: list[torch.Tensor | Spilled] = []
        self.held_bytes = 0
        self._folder: Path | None = None
        self._names = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def _spill(self, tensor: torch.Tensor) -> Spilled:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="hfprune-activations-"))
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        return Spilled(self._folder / f"{next(self._names)}.pt", tensor)

    def _fits(self, size: int) -> bool:
        return self.budget is None or self.held_bytes + size <= self.budget

    def append(self, tensor: torch.Tensor) -> None:
        size = nbytes(tensor)
        if self._fits(size):
            self.entries.append(tensor.to(self.device))
            self.held_bytes += size
        else:
            self.entries.append(self._spill(tensor))

    def get(self, position: int) -> torch.Tensor:
        return self.load(self.entries[position])

    def load(self, entry: torch.Tensor | Spilled) -> torch.Tensor:
        return entry.load(self.device) if isinstance(entry, Spilled) else entry

    def replace(self, position: int, tensor: torch.Tensor) -> torch.Tensor | Spilled:
        """Put `tensor` where batch `position` was (held or spilled as before); the new entry."""
        old = self.entries[position]
        if isinstance(old, Spilled):
            new: torch.Tensor | Spilled = self._spill(tensor)
        else:
            self.held_bytes += nbytes(tensor) - nbytes(old)
            new = tensor.to(self.device)
        self.entries[position] = new
        return new

    def summary(self) -> dict[str, Any]:
        """How the activations are held: the figures `prune_report.json` records under `activations`."""
        spilled = [e for e in self.entries if isinstance(e, Spilled)]
        sizes = [e.nbytes if isinstance(e, Spilled) else nbytes(e) for e in self.entries]
        return {
            "budget_bytes": self.budget,
            "batches": len(self.entries),
            "batch_bytes": max(sizes, default=0),
            "total_bytes": sum(sizes),
            "held_batches": len(self.entries) - len(spilled),
            "held_bytes": self.held_bytes,
            "held_on": str(self.device),
            "spilled_batches": len(spilled),
            "spilled_bytes": sum(e.nbytes for e in spilled),
            "spill_folder": None if self._folder is None else str(self._folder),
        }

    def finish_capture(self) -> dict[str, Any]:
        """Log how the calibration set's hidden states are held, once they are all stored; the summary."""
        s = self.summary()
        budget = "no budget" if self.budget is None else f"budget {format_bytes(self.budget)}"
        spilled = (
            f"; {s['spilled_batches']} spilled to {s['spill_folder']} ({format_bytes(s['spilled_bytes'])})"
            if s["spilled_batches"]
            else ""
        )
        logger.info(
            "%s: hidden states of %d calibration batches (%s each, %s in all): %d held on %s (%s, %s)%s",
            self.label, s["batches"], format_bytes(s["batch_bytes"]), format_bytes(s["total_bytes"]),
            s["held_batches"], s["held_on"], format_bytes(s["held_bytes"]), budget, spilled,
        )  # fmt: skip
        return s
