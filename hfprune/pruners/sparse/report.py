"""Small helpers of the sparse pruners: parameter names, statistics to the host, timing, the result.

Sits beside `base` (the shared plumbing of `wanda`, `sparsegpt` and `magnitude`): what turns
the masks of a finished prune into the `PruneResult` whose details `prune_report.json` records.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from hfprune.architectures.base import ParamCount
from hfprune.masks.storage import sparsity_report
from hfprune.models.structure import count_config_parameters
from hfprune.pruners.base import PruneResult, TargetShape
from hfprune.pruners.options import Pattern


logger = logging.getLogger(__name__)

LayerStats = dict[str, torch.Tensor]


def param_names(model: PreTrainedModel) -> dict[int, str]:
    return {id(param): name for name, param in model.named_parameters()}


def stats_to_cpu(stats: LayerStats) -> LayerStats:
    """Move a layer's statistics to the CPU, keeping one copy per group that shares it."""
    moved: dict[int, torch.Tensor] = {}
    for tensor in stats.values():
        if id(tensor) not in moved:
            moved[id(tensor)] = tensor.cpu()
    return {name: moved[id(tensor)] for name, tensor in stats.items()}


@contextlib.contextmanager
def timed(totals: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # kernels are asynchronous; without this GPU work lands in the wrong bucket
    totals[key] = totals.get(key, 0.0) + time.perf_counter() - start


def sparse_result(
    name: str,
    pattern: Pattern,
    model: PreTrainedModel,
    masks: dict[str, torch.Tensor],
    ratio: float,
    sequential: bool,
    timing: dict,
) -> PruneResult:
    """The pruned model, its plan-shaped parameter counts and the sparsity report."""
    before = count_config_parameters(model.config)
    pruned = sum(keep.numel() - int(keep.count_nonzero()) for keep in masks.values())
    shape = TargetShape({}, before, ParamCount(before.total - pruned, before.embedding), ratio)
    report = sparsity_report(model, masks)
    logger.info(
        "%s: %s sparsity %.4f of the linear weights (%.4f of non-embedding parameters)",
        name,
        report["pattern"],
        report["sparsity"],
        shape.ratio_achieved,
    )
    details = {
        "pattern": str(pattern),
        "sequential": sequential,
        "sparsity": report,
        "timing_seconds": {key: round(value, 3) for key, value in timing.items()},
    }
    return PruneResult(model=model, shape=shape, details=details, masks=masks)
