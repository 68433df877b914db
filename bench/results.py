"""Shared by the benchmark scripts: the machine description and section-wise updates of RESULTS.md.

Each script owns one `## <heading>` section of bench/RESULTS.md and replaces only that section, so
benchmarks can be rerun independently.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch

from hfprune.eval.perplexity import perplexity


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak` is the highest seen while running.

    ru_maxrss only ever grows over the whole process, so it cannot isolate one pruning run.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def machine() -> str:
    """CPU cores and model, memory, GPU and torch version of the machine running the benchmark."""
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem_gib:.0f} GiB, {gpu}; torch {torch.__version__}"


def evaluate(model: Any, windows: tuple[torch.Tensor, bool, Any], batch_size: int) -> float:
    """Held-out perplexity of `model` on prepared (windows, has_bos, selection) from `evaluation_windows`."""
    batch, bos, _ = windows
    return perplexity(model, batch, bos, {"path": "shakespeare test"}, batch_size).value


def replace_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the `## {heading}` section of RESULTS.md, leaving every other section alone."""
    title = f"## {heading}"
    text = f"{title}\n\n{body.strip()}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        path.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text + ("\n" + tail if tail else ""))
