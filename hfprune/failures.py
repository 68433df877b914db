"""Low-level failures a user can fix, turned into one-line `RunFailure`s: a full disk, a missing
permission, an accelerator out of memory.

Such failures surface deep inside torch, safetensors, the Trainer, huggingface_hub or datasets as
exceptions that name neither the folder nor the fix (`SafetensorError: ... No space left on device (os
error 28)`, `RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos`, pyarrow's `[errno
28]`, `torch.OutOfMemoryError`). `hfprune.outputs` wraps every write of the output folder in `writes_to`,
the train stage wraps its checkpoint saves in it, and the pipeline wraps each stage in `writes_to` (the
output folder) and `translate_oom`; each turns the low-level error into a message that says what failed,
where (the output folder, the Hugging Face cache or the temporary folder: the one that is full), and which
setting to change before rerunning. The fault is recognised by its errno, or by the OS error code the
library's message carries (`os error N`, `code: N`, `[errno N]`, also through `__cause__`); anything
not recognised passes through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hfprune.errors import HfpruneError, RunFailure


RERUN = "then rerun: finished stages and complete training checkpoints are kept"

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
_FULL = {errno.ENOSPC, errno.EDQUOT}
# The OS error code as the Rust (safetensors: `os error 28`, older `Os { code: 28`) and Arrow (`[errno
# 28]`) libraries spell it inside their own exception's message.
_OS_CODE = re.compile(r"(?:os error |code: |\[errno )(\d+)", re.IGNORECASE)
_TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed", "inline_container.cc")
# The OS's words, or a library's own for them (datasets checks the room before it writes a cache).
_FULL_WORDS = {
    "No space left on device": errno.ENOSPC,
    "Not enough disk space": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
}
# Where a checkpoint's size comes from: what makes the Trainer's checkpoints of a run smaller or fewer.
_CHECKPOINT_KNOBS = "lower train.args.save_total_limit or raise train.args.save_steps"


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
    (a full disk is one wherever it happens: then the message names the folder that is full), an OS
    error code in the message of a library's own exception (safetensors, pyarrow), and torch's serializer
    failure. Anything else, hfprune's own errors included, is not a failed write of ours and is left alone.
    """
    if isinstance(err, OutputError):
        return err
    found = None if isinstance(err, HfpruneError) else _fault(err)
    if found is None:
        return None
    code, detail, filename = found
    within = within or target
    ours = _is_under(Path(filename), within) if filename else code is None or code in _WRITE_FIXES
    if not ours and code not in _ALWAYS_WRITES:
        return None
    where, label, cache_fix = _where(target, within, filename, code)
    if code is None:
        # torch does not say why a write failed; a disk with no room left is by far the usual reason.
        code = errno.ENOSPC if label is not None else None
    reason, fix = _WRITE_FIXES.get(code or -1, (detail, "check the disk and the folder's permissions"))
    if code in _FULL:
        fix = f"{fix} there or {cache_fix}" if cache_fix else _output_space_fix(fix, where)
    if code in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_in_the_way(within)):
        reason, fix = f"{blocker} is a file, not a folder", "point output_dir at a folder or move the file"
    message = (
        f"could not write {where}{label or ''}: {reason}; {fix}, {RERUN} and nothing earlier was replaced"
    )
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


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and the exceptions it was raised from (a library re-raising an OS error as its own)."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen and len(seen) < 8:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _fault(err: BaseException) -> tuple[int | None, str, str | None] | None:
    """(errno, detail, file) of a failed write anywhere in `err`'s chain; errno None: torch's serializer."""
    for link in _chain(err):
        text = str(link)
        if isinstance(link, OSError) and link.errno:
            return link.errno, link.strerror or text, link.filename
        found = _OS_CODE.search(text)
        if found:
            code = int(found.group(1))
            if isinstance(link, OSError) or type(link).__name__ == "SafetensorError" or code in _FULL:
                return code, os.strerror(code), None
        words = next((code for words, code in _FULL_WORDS.items() if words in text), None)
        if words is not None:
            return words, os.strerror(words), getattr(link, "filename", None)
        if isinstance(link, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILURE):
            return None, "the write failed", None
    return None


def _where(
    target: Path, within: Path, filename: str | None, code: int | None
) -> tuple[Path, str | None, str]:
    """The folder to name, its label (None: no full disk seen) and how to move it to a larger disk.

    A file outside `within` names the shared folder it lies in (the Hugging Face cache, the temporary
    folder); a full disk without a file name names the first of `within` and those folders that is full.
    """
    if filename and not _is_under(Path(filename), within):
        for label, folder, fix in _shared_folders():
            if _is_under(Path(filename), folder):
                return folder, f" ({label})", fix
        return Path(filename).parent, "", ""
    if code is None or code in _FULL:
        if _disk_full(within):
            return target, "", ""
        for label, folder, fix in _shared_folders():
            if _disk_full(folder):
                return folder, f" ({label})", fix
    return target, (None if code is None else ""), ""


def _shared_folders() -> list[tuple[str, Path, str]]:
    """The folders outside the output folder that a stage writes: caches and the temporary folder."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    return [
        ("the Hugging Face cache", Path(constants.HF_HUB_CACHE), "set HF_HOME to a folder on a larger disk"),
        (
            "the datasets cache",
            Path(datasets_config.HF_DATASETS_CACHE),
            "set HF_DATASETS_CACHE to a folder on a larger disk",
        ),
        ("the temporary folder", Path(tempfile.gettempdir()), "set TMPDIR to a folder on a larger disk"),
    ]


def _output_space_fix(fix: str, where: Path) -> str:
    """Room in the output folder: free it, or move the run; checkpoints also shrink with their knobs."""
    fix = f"{fix} on its disk or choose an output_dir on a larger one"
    return f"{fix} ({_CHECKPOINT_KNOBS})" if ".hfprune" in where.parts else fix


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
