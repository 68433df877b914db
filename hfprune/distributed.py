"""Process-group helpers for runs launched with torchrun (`torchrun --nproc_per_node=N -m hfprune run R`).

The pipeline needs only three things from distributed training outside the Trainer: who is the main
process (the only one that writes outputs), a barrier between stages, and a process group that
outlives long single-process stages (pruning an 8B parent on rank 0 can take longer than the default
30-minute collective timeout while the other ranks wait). The Trainer and accelerate reuse the group
created here.
"""

from __future__ import annotations

import datetime
import os


STAGE_TIMEOUT = datetime.timedelta(hours=6)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def ensure_process_group() -> None:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) when launched with several processes."""
    import torch  # here: rank checks and the planning that uses them run without torch
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=STAGE_TIMEOUT)


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        ensure_process_group()
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group; without it torchrun processes may abort at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
