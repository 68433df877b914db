"""Atomic writes and stage bookkeeping for the output folder.

Every stage of the pipeline publishes its result through `atomic_dir` or `write_json` (write to a
temporary sibling, then rename), so an interrupted or failed run never leaves a half-written
checkpoint or metrics file behind. `StageLedger` records, per stage, a fingerprint of the inputs it
ran with; a rerun skips a stage whose fingerprint is unchanged and whose outputs still exist.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from hfprune.errors import RunFailure



class OutputError(RunFailure, OSError):
    """Writing an output failed (full disk, permissions); nothing that existed was replaced."""


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _output_error(target, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing any previous `target` with renames only."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def distributed_staging_dir(target: Path) -> Iterator[Path]:
    """Like `atomic_dir`, with a staging path every process agrees on (collective saves write into it).

    Only the main process creates, publishes or removes it; callers synchronise around collective work.
    """
    from hfprune import distributed

    staging = target.with_name(f".{target.name}.staging")
    if distributed.is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    try:
        yield staging
        distributed.barrier()
        if distributed.is_main_process():
            replace_dir(staging, target)
    except OSError as err:
        if distributed.is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        raise _output_error(target, err) from err
    except BaseException:
        if distributed.is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _output_error(path, err) from err


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _output_error(path: Path, err: OSError) -> OutputError:
    reason = "no space left on device" if err.errno == errno.ENOSPC else err.strerror or str(err)
    return OutputError(
        err.errno, f"could not write {path}: {reason}; the previous output (if any) is unchanged"
    )


class StageLedger:
    """`<output_dir>/.hfprune/stages.json`: which stages finished, with which input fingerprints."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / ".hfprune" / "stages.json"
        self.entries: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the ledger (another process may have recorded stages since)."""
        self.entries = read_json(self.path, {})

    def is_current(self, stage: str, fingerprint: str, *outputs: Path) -> bool:
        return self.entries.get(stage) == fingerprint and all(p.exists() for p in outputs)

    def record(self, stage: str, fingerprint: str) -> None:
        self.entries[stage] = fingerprint
        write_json(self.path, self.entries)
