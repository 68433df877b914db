"""Test-only kill points: the fault-injection suite (tests/test_fault_injection.py) stops a run dead here.

A kill point is a named moment of a run (a stage boundary, inside a checkpoint save, inside the final
save of a trained model, inside a push). With `HFPRUNE_TEST_KILL_AT=<point>` in the environment the
process SIGKILLs itself the first time it reaches that point (`<point>:N`: the N-th time), as a power
cut or an OOM killer would: no cleanup, no `finally`. Without the variable `kill_point` does nothing.
"""

from __future__ import annotations

import os
import signal
from collections import Counter


ENV = "HFPRUNE_TEST_KILL_AT"
_reached: Counter[str] = Counter()


def kill_point(point: str) -> None:
    """SIGKILL this process if `HFPRUNE_TEST_KILL_AT` names `point` (at its N-th passage with `:N`)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, nth = wanted.rpartition(":") if wanted.rpartition(":")[2].isdigit() else (wanted, "", "1")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
