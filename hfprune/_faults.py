"""Test-only fault points: the fault-injection suite (tests/test_fault_injection.py) stops a run dead
here, and the full-disk suite (tests/test_failures.py) fills its disk here.

A fault point is a named moment of a run (a stage boundary, inside a checkpoint save, once a checkpoint
is complete, inside the final save of a trained model, inside a push). With `HFPRUNE_TEST_KILL_AT=<point>`
in the environment the process SIGKILLs itself the first time it reaches that point (`<point>:N`: the
N-th time), as a power cut or an OOM killer would: no cleanup, no `finally`. With
`HFPRUNE_TEST_FILL_AT=<point>[:N]` another process (`cat /dev/zero`) fills the file system of
`HFPRUNE_TEST_FILL_FILE` at that point, as a neighbour taking the space after the run started would.
Without the variables `kill_point` does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter


ENV = "HFPRUNE_TEST_KILL_AT"
FILL_ENV = "HFPRUNE_TEST_FILL_AT"
FILL_FILE_ENV = "HFPRUNE_TEST_FILL_FILE"
_reached: Counter[tuple[str, str]] = Counter()


def kill_point(point: str) -> None:
    """SIGKILL this process if `HFPRUNE_TEST_KILL_AT` names `point` (at its N-th passage with `:N`);
    fill the disk of `HFPRUNE_TEST_FILL_FILE` if `HFPRUNE_TEST_FILL_AT` names it."""
    if _due(ENV, point):
        os.kill(os.getpid(), signal.SIGKILL)
    if _due(FILL_ENV, point):
        # A separate process, as a neighbour would be; it stops when the disk is full (cat fails).
        subprocess.run(
            ["sh", "-c", 'cat /dev/zero > "$0"', os.environ[FILL_FILE_ENV]],
            check=False,
            stderr=subprocess.DEVNULL,
        )


def _due(env: str, point: str) -> bool:
    """Whether the fault `env` names is due at this passage of `point`."""
    wanted = os.environ.get(env)
    if not wanted:
        return False
    name, _, nth = wanted.rpartition(":") if wanted.rpartition(":")[2].isdigit() else (wanted, "", "1")
    if name != point:
        return False
    _reached[env, point] += 1
    return _reached[env, point] == int(nth)
