"""The one error base class: every failure a user can cause or fix is an `HfpruneError`.

Each subclass carries the exit code the command line uses for it (`InvalidInput`: 2, an invalid
recipe or command line, found before any work; `RunFailure`: 1, a run-time failure such as a missing
parent, an unreachable Hub or a full disk). `cli.py` catches this base class once and prints the
message on one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HfpruneError(Exception):
    """Base of hfprune's own errors; `exit_code` is what the command line exits with."""

    exit_code: int = 1


class InvalidInput(HfpruneError):
    """The recipe or the command line is wrong: fixable before any work starts."""

    exit_code = 2


class RunFailure(HfpruneError):
    """The run could not finish: missing files, network, disk, an impossible shape or setup."""

    exit_code = 1
