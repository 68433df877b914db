"""Reliability table: kill points, invalid inputs and run-time faults tried on the tiny parent, each with
its observed outcome, printed as the markdown of RELIABILITY.md.

    .venv/bin/python bench/reliability_table.py > RELIABILITY.md

Kill points: `hfprune run` in a subprocess SIGKILLs itself at the point (`HFPRUNE_TEST_KILL_AT`, see
`hfprune._faults`), a second `hfprune run` completes it, and the result is compared with an uninterrupted
run's (tokens trained, every tensor of every `models/<kind>/model.safetensors`, metrics bar wall-clock
seconds). Invalid inputs and faults run the command line in this process (a full disk at a training
checkpoint is a real one: a tmpfs another process fills, `conftest.run_on_small_fs`; the other faults
that need a broken disk or device are simulated by making the library call raise what it raises then). About 5 minutes on
two busy cores; the same checks, asserted, are tests/test_fault_injection.py, tests/test_reliability.py,
tests/checks/test_preflight.py, tests/recipe/test_schema.py, tests/test_cli.py and tests/masks/test_parent.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from reliability_cases import HUB, PUSH, TRAIN, Bench, cell, cli, fault_rows, invalid_rows
from safetensors.torch import load_file


KILL_POINTS = [
    ("after:parent_eval", "after the parent's evaluation"),
    ("unrecorded:prune", "pruned model saved, stage not yet recorded"),
    ("atomic_save:1", "inside the pruned model's save (written, not yet renamed)"),
    ("after:prune", "after the prune stage"),
    ("checkpoint_save:1", "inside the first training checkpoint's save"),
    ("checkpoint_save:3", "inside a mid-training checkpoint's save"),
    ("checkpoint_save:4", "inside the final checkpoint's save"),
    ("final_save", "trained model staged, not yet published"),
    ("unrecorded:train_continued", "trained model published, stage not yet recorded"),
    ("after:continued_eval", "after the trained model's evaluation"),
    ("push", "inside the push: first commit on the local Hub, not yet recorded"),
]


def hfprune(path: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`hfprune run` in a subprocess (which `kill_at` stops dead)."""
    env = {**os.environ, **({"HFPRUNE_TEST_KILL_AT": kill_at} if kill_at else {})}
    command = [sys.executable, "-m", "hfprune", "run", str(path), *args]
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True)


def comparable(metrics: object) -> object:
    if isinstance(metrics, dict):
        drop = ("resumed_from", "hub")
        return {k: comparable(v) for k, v in metrics.items() if "seconds" not in k and k not in drop}
    return [comparable(v) for v in metrics] if isinstance(metrics, list) else metrics


def compare(out: Path, reference: Path) -> str:
    """What differs from the uninterrupted run, or the evidence that nothing does."""
    got, expected = (json.loads((p / "metrics.json").read_text()) for p in (out, reference))
    if comparable(got) != comparable(expected):
        return "metrics differ"
    tensors = 0
    for weights in sorted((reference / "models").glob("*/model.safetensors")):
        mine, theirs = load_file(out / weights.relative_to(reference)), load_file(weights)
        if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
            return f"weights of {weights.parent.name} differ"
        tensors += len(mine)
    resumed = got["continued"].get("training", {}).get("resumed_from")
    note = f", resumed from {resumed}" if resumed else ""
    return f"same {got['continued']['tokens_trained']} tokens, same {tensors} tensors, same metrics{note}"


def kill_rows(bench: Bench) -> list[tuple[str, str, str]]:
    """Each point: killed in a subprocess, then completed by `hfprune run` in this process."""
    assert cli("run", str(bench.recipe("reference"))) == "exit 0: finished"
    rows = []
    for index, (point, where) in enumerate(KILL_POINTS):
        path = bench.recipe(f"kill{index}", TRAIN + (PUSH if point == "push" else ""))
        killed = hfprune(path, kill_at=point)
        if killed.returncode != -signal.SIGKILL:
            rows.append((f"`{point}`", where, f"not reached (exit {killed.returncode})"))
            continue
        rerun = cli("run", str(path))
        finished = rerun == "exit 0: finished"
        same = compare(bench.out(f"kill{index}"), bench.out("reference")) if finished else ""
        outcome = f"rerun finished: {same}" if finished else f"rerun {rerun}"
        rows.append((f"`{point}`", where, outcome))
    return rows


INTRO = (
    "What `hfprune` does when a run is killed, given invalid input, or hits a fault at run time, tried on "
    "a tiny random Llama parent (8 layers, shortgpt 0.5, 1,024 training tokens in 8 steps, a checkpoint "
    "every 2). Reproduce with `.venv/bin/python bench/reliability_table.py > RELIABILITY.md` (under 10 "
    "minutes on two busy cores, about 4 minutes of CPU); the same cases are asserted by the test suite (tests/test_fault_injection.py, "
    "whose slow test tries every stage boundary and save; tests/test_reliability.py; tests/checks/test_preflight.py; "
    "tests/masks/test_parent.py)."
)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c, 400) for c in row) + " |" for row in rows])


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what the runs print (the tokenizer trainer writes to file descriptor 1 itself) to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main_table() -> str:
    """The whole document; what the runs print goes to stderr, and scratch paths read `<scratch>`."""
    with tempfile.TemporaryDirectory() as scratch, stdout_to_stderr():
        bench = Bench(Path(scratch))
        kills = kill_rows(bench)
        invalid = invalid_rows(bench)
        faults = fault_rows(bench)
    text = "\n\n".join(
        [
            "# Reliability",
            INTRO,
            "## Kill points\n\n`hfprune run` SIGKILLed at the point (`HFPRUNE_TEST_KILL_AT`), then `hfprune run` "
            "again, compared with an uninterrupted run.\n\n" + table(("point", "where", "outcome"), kills),
            "## Invalid inputs\n\n`hfprune run RECIPE [overrides]`, with weight loading made to fail so any work "
            "before the checks would show.\n\n" + table(("input", "outcome"), invalid),
            "## Run-time faults\n\nDisk and device faults are simulated by making the library call raise what it "
            "raises then.\n\n" + table(("fault", "outcome"), faults),
        ]
    )
    return text.replace(scratch, "<scratch>")


if __name__ == "__main__":
    try:
        sys.stdout.write(main_table() + "\n")
    finally:
        HUB.stop()
