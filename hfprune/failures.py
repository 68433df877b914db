"""Low-level failures a user can fix, turned into one-line `RunFailure`s: a full disk, a missing
permission, an accelerator out of memory.

Such failures surface deep inside torch, safetensors or the Trainer as exceptions that name neither the
folder nor the fix (`SafetensorError ... No space left on device`, `RuntimeError: [enforce fail at
inline_container.cc]`, `torch.OutOfMemoryError`). `hfprune.outputs` wraps every write of the output
folder in `writes_to`, the train stage wraps its checkpoint saves in it, and the pipeline wraps each
stage in `translate_oom`; each turns the low-level error into a message that says what failed, where,
and which setting to change before rerunning. Anything they do not recognise passes through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from hfprune.errors import RunFailure


RERUN = "then rerun: finished stages are kept"

# What a write can end in through no fault of hfprune, and what the user does about it.
_WRITE_FIXES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EACCES: ("permission denied", "make the folder writable"),
    errno.EPERM: ("operation not permitted", "make the folder writable"),
    errno.EROFS: ("read-only file system", "choose a writable output_dir"),
}
# Errors that can only come from writing, wherever the file lies (a read never fills a disk).
_ALWAYS_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_RUST_OS_CODE = re.compile(r"code: (\d+)")
_TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed", "inline_container.cc")


class OutputError(RunFailure, OSError):
    """Writing an output failed (full disk, permissions); nothing that existed was replaced.

    Built as `OutputError(errno, message)`; it reads as the message alone, without `[Errno N]`.
    """

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class OutOfMemory(RunFailure):
    """A stage ran out of memory; the message names the stage and the settings that lower its memory."""


def write_failure(err: BaseException, target: Path, within: Path | None = None) -> OutputError | None:
    """The `OutputError` for `err` raised while writing `target` (files under `within`), or None.

    Recognised: an `OSError` that names a file under `within`, or names none and is a known write failure
    (a full disk is one wherever it happens), a safetensors error carrying an OS error code, and torch's
    serializer failure. Anything else is not a failed write of ours and is left alone.
    """
    if isinstance(err, OutputError):
        return err
    within = within or target
    code: int | None
    if isinstance(err, OSError):
        code = err.errno
        ours = _is_under(Path(err.filename), within) if err.filename else code in _WRITE_FIXES
        if not ours and code not in _ALWAYS_WRITES:
            return None
        detail = err.strerror or str(err)
    elif type(err).__name__ == "SafetensorError" and (found := _RUST_OS_CODE.search(str(err))):
        code = int(found.group(1))
        detail = os.strerror(code)
    elif isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURE):
        # torch does not say why a write failed; a disk with no room left is by far the usual reason.
        code, detail = (errno.ENOSPC if _disk_full(within) else None), "the write failed"
    else:
        return None
    reason, fix = _WRITE_FIXES.get(code or -1, (detail, "check the disk and the folder's permissions"))
    if code in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_in_the_way(within)):
        reason, fix = f"{blocker} is a file, not a folder", "point output_dir at a folder or move the file"
    message = f"could not write {target}: {reason}; {fix}, {RERUN} and nothing earlier was replaced"
    return OutputError(code or errno.EIO, message)


@contextlib.contextmanager
def writes_to(target: Path, within: Path | None = None) -> Iterator[None]:
    """Run a block that writes `target` (files under `within`); a failed write becomes an `OutputError`."""
    try:
        yield
    except Exception as err:
        mapped = write_failure(err, target, within)
        if mapped is None or mapped is err:
            raise
        raise mapped from err


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _disk_full(folder: Path) -> bool:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    try:
        return existing is not None and shutil.disk_usage(existing).free < 1 << 20
    except OSError:
        return False


def _file_in_the_way(folder: Path) -> Path | None:
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


# -- out of memory ----------------------------------------------------------------------------------
_TRAIN_KNOBS = (
    "train.args.per_device_train_batch_size (raise train.args.gradient_accumulation_steps to keep the "
    "tokens per step) or train.seq_len, or set train.args.gradient_checkpointing: true"
)
# The recipe settings that lower a stage's peak memory, by the first matching fragment of its name.
_MEMORY_KNOBS: tuple[tuple[str, str], ...] = (
    ("train", _TRAIN_KNOBS),
    ("eval", "eval.batch_size (eval.lm_eval.batch_size for lm-eval tasks) or eval.perplexity.N.seq_len"),
    ("prune", "calibration.batch_size or calibration.seq_len"),
    ("calib", "calibration.batch_size or calibration.seq_len"),
    ("parent", "parent.dtype (bfloat16 halves float32's memory) or eval.batch_size"),
)
_ALL_KNOBS = (
    "train.args.per_device_train_batch_size, calibration.batch_size, eval.batch_size or the seq_len settings"
)
_ALLOCATION = re.compile(r"Tried to allocate ([\d.]+ [KMGT]iB)")


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeError other backends (MPS, the CPU allocator) raise."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text.lower() or "DefaultCPUAllocator: can't allocate memory" in text
    )


def out_of_memory_failure(err: BaseException, stage: str) -> OutOfMemory:
    """The one-line failure for `err`, naming the stage and the settings that lower its memory."""
    knobs = next((text for fragment, text in _MEMORY_KNOBS if fragment in stage), _ALL_KNOBS)
    found = _ALLOCATION.search(str(err))
    detail = f" (tried to allocate {found.group(1)})" if found else ""
    return OutOfMemory(f"out of memory in stage {stage}{detail}: lower {knobs}; {RERUN}")


@contextlib.contextmanager
def translate_oom(stage: str) -> Iterator[None]:
    """Run one pipeline stage; running out of memory becomes an `OutOfMemory` failure naming the knobs."""
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise out_of_memory_failure(err, stage) from err
