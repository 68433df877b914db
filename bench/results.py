"""Shared by the benchmark scripts: the machine description and section-wise updates of RESULTS.md.

Each script owns one `## <heading>` section of bench/RESULTS.md and replaces only that section, so
benchmarks can be rerun independently.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


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
