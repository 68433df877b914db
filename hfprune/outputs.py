"""Atomic writes, the output-folder lock and stage bookkeeping for the output folder.

Every stage of the pipeline publishes its result through `atomic_dir` or `write_json` (write to a
temporary sibling, then rename), so an interrupted or failed run never leaves a half-written
checkpoint or metrics file behind; a failed write (full disk, permissions) becomes a one-line
`OutputError` (see `hfprune.failures`). At the start of a run the pipeline takes `output_lock`, so one
process at a time writes a folder, and calls `remove_stale_temporaries` to clear what a killed run left.
`StageLedger` records, per stage, a fingerprint of the inputs it ran with; a rerun skips a stage whose
fingerprint is unchanged and whose outputs still exist.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hfprune._faults import kill_point
from hfprune.errors import RunFailure
from hfprune.failures import write_failure, writes_to


logger = logging.getLogger(__name__)

# The names of this module's temporaries, beside their target `<name>`: `.<name>.tmp-<pid>[-<hex>]`
# (atomic_dir, write_text; older versions used 8 random characters), `.<name>.old-<pid>` (replace_dir)
# and `.<name>.staging` (distributed_staging_dir).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:(?P<kind>tmp|old)-[a-z0-9_-]+|staging)$")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename."""
    with writes_to(target, target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_dir(target)
    try:
        with writes_to(target, target.parent):
            yield tmp
            kill_point("atomic_save")
            replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temporary_dir(target: Path) -> Path:
    """A new, empty sibling of `target` with the mode of any other folder (umask), unlike mkdtemp's 0700."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        with contextlib.suppress(FileExistsError):
            tmp.mkdir()
            return tmp


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
    main = distributed.is_main_process()
    if main:
        with writes_to(target, target.parent):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
    distributed.barrier()
    try:
        with writes_to(target, target.parent):
            yield staging
            distributed.barrier()
            if main:
                kill_point("final_save")
                replace_dir(staging, target)
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_temporaries(out_dir: Path, *, recursive: bool = True, only: str | None = None) -> list[Path]:
    """Remove the temporaries of writes that a killed run left in `out_dir`; returns what was removed.

    Only this module's temporaries are touched, recognised by name. A `.<name>.old-<pid>` whose
    `<name>` is missing (killed between the two renames of `replace_dir`) is the last published
    version: it is renamed back instead. Call it at run start, holding `output_lock`; without
    `recursive`, only `out_dir`'s own entries (a sweep folder, whose cells have locks of their own); with
    `only`, only the temporaries of the entry of that name (a pretrained parent's folder).
    """
    removed: list[Path] = []
    for folder, dirnames, filenames in os.walk(out_dir):
        for name in [*dirnames, *filenames]:
            found = _TEMPORARY.match(name)
            if not found or only not in (None, found["name"]):
                continue
            path, target = Path(folder, name), Path(folder, found["name"])
            if name in dirnames:
                dirnames.remove(name)  # never descend into what is about to go
            if found["kind"] == "old" and not target.exists() and not target.is_symlink():
                logger.info("restoring %s, left aside by an interrupted replace", target)
                path.rename(target)
                continue
            logger.info("removing %s, left by an interrupted write", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        if not recursive:
            break  # os.walk yields `out_dir` itself first
    return removed


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writes_to(path, path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except NotADirectoryError as err:  # an output_dir that is a file, say
        raise write_failure(err, path, path.parent) or err from err


# -- one writer per output folder -------------------------------------------------------------------
class OutputInUse(RunFailure):
    """Another process holds the output folder's lock."""


LOCK_FILE = Path(".hfprune") / "lock"
_held: set[Path] = set()  # the lock files this process holds


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold `<out_dir>/.hfprune/lock` while a run writes `out_dir`; another holder fails the call at once.

    The lock is an `flock` on the file, which the kernel releases when its holder dies however it dies,
    so a lock left by a killed run is simply taken over. The file records the holder (pid, host,
    command) for the message others get, and is removed on release, with the folders the lock created
    if nothing else was written there. Under torchrun only the main process locks; re-entering in the
    process that holds the lock is a no-op.
    """
    from hfprune import distributed

    path = (out_dir / LOCK_FILE).absolute()
    if not distributed.is_main_process() or path in _held:
        yield
        return
    created = [p for p in (path.parent, path.parent.parent) if not p.exists()]
    with writes_to(out_dir, out_dir):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, out_dir)
    if fd is None:
        yield
        return
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        _release(fd, path, created)


def _acquire(path: Path, out_dir: Path) -> int | None:
    """The locked file's descriptor; None where the file system has no locks (some network mounts)."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.read(fd, 4096))
            os.close(fd)
            raise OutputInUse(
                f"output folder {out_dir} is in use by {holder}; wait for that run to finish or stop it, "
                "then rerun (one run at a time writes a folder)"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            logger.warning("cannot lock %s (%s): a second run on it would not be stopped", out_dir, err)
            return None
        # The previous holder may have removed the file between our open and our lock: lock the file
        # that is there now, never an orphan.
        if path.exists() and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)
    previous = os.read(fd, 4096)
    if previous.strip():
        logger.info("taking over the lock of %s, which ended without releasing it", _holder(previous))
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _holder(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        return f"process {info['pid']} on {info['host']} (since {info['started']}: {info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"


def _release(fd: int, path: Path, created: list[Path]) -> None:
    # Unlink while still holding the lock: a waiter that opened the old file notices and retries.
    with contextlib.suppress(OSError):
        path.unlink()
        for folder in created:
            folder.rmdir()  # only when empty: a run that wrote nothing leaves nothing
    os.close(fd)


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
