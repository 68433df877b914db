"""Pure tensor math of the sparse pruners: keep-masks from scores, and SparseGPT's OBS reconstruction.

Sits under `hfprune.pruners.sparse.base`, which owns the model, the hooks and the calibration walk; nothing
here knows about layers, hooks or devices, so every function is testable on plain tensors. Weights
are (out_features, in_features); masks are bool with True = keep; scores are "higher = more
important" and the lowest are pruned.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from hfprune.errors import RunFailure
from hfprune.pruners.options import Pattern


PATTERNS = ("unstructured", "2:4", "4:8")


class HessianError(RunFailure, ValueError):
    """A calibration Hessian that SparseGPT cannot invert (not positive definite, or not finite)."""


def pruned_count(n: int, ratio: float) -> int:
    """Weights pruned from a comparison group of `n` at `ratio`: floor(n * ratio), as Wanda does.

    The epsilon stops float error from dropping one weight (0.29 * 100 is 28.999999999999996).
    """
    return math.floor(n * ratio + 1e-6)


def nm_keep_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the `pattern.keep` highest scores in every group of `pattern.group` consecutive columns."""
    rows, cols = scores.shape
    if cols % pattern.group:
        raise ValueError(f"{pattern} needs in_features divisible by {pattern.group}, got {cols}")
    groups = scores.reshape(rows, cols // pattern.group, pattern.group)
    drop = torch.topk(groups, pattern.group - pattern.keep, dim=-1, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    return keep.reshape(rows, cols)


def lowest_in_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at exactly the `k` lowest scores of every row of a 2-D tensor, ties broken by position.

    A k-th value selection plus a comparison: several times faster than topk or sort with k near
    n / 2 on a CPU, and it allocates nothing of the index type for the common case without ties.
    """
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values
    lowest = scores < threshold
    ties = scores == threshold
    missing = k - lowest.count_nonzero(dim=1).unsqueeze(1)
    if bool((ties.count_nonzero(dim=1).unsqueeze(1) == missing).all()):
        return lowest.logical_or_(ties)
    return lowest.logical_or_(ties & (ties.cumsum(dim=1) <= missing))


def row_keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the same number of lowest scores from every row (Wanda's per-output comparison group)."""
    return ~lowest_in_rows(scores, pruned_count(scores.shape[1], ratio))


def matrix_keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the lowest scores of the whole matrix (one threshold, rows may differ)."""
    flat = scores.reshape(1, -1)
    return ~lowest_in_rows(flat, pruned_count(flat.shape[1], ratio)).reshape(scores.shape)


def wanda_scores(weight: torch.Tensor, input_sq_sums: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with ||X_j||^2 summed over calibration tokens (scale is irrelevant per row)."""
    return weight.abs().float() * input_sq_sums.float().sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, input_sq_sums: torch.Tensor, ratio: float, pattern: Pattern
) -> torch.Tensor:
    scores = wanda_scores(weight, input_sq_sums)
    return nm_keep_mask(scores, pattern) if pattern.is_nm else row_keep_mask(scores, ratio)


def magnitude_mask(weight: torch.Tensor, ratio: float, pattern: Pattern) -> torch.Tensor:
    scores = weight.abs().float()
    return nm_keep_mask(scores, pattern) if pattern.is_nm else matrix_keep_mask(scores, ratio)


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 (so U^T U is the inverse), in fp32.

    lambda = dampening * mean(diag H). Inputs that were always zero get a unit diagonal: their weights
    never reach the outputs, and the unit entry keeps H invertible without coupling them to others.
    """
    h = hessian.to(torch.float32, copy=True)
    if not torch.isfinite(h).all():
        raise HessianError("the calibration Hessian has non-finite entries (inf or NaN activations)")
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal.add_(dampening * diagonal.mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper
    raise HessianError(
        f"the calibration Hessian is not positive definite after dampening ({dampening:g} x its mean "
        "diagonal); raise prune.options.dampening or calibrate on more tokens"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    upper: torch.Tensor,
    ratio: float,
    pattern: Pattern,
    block_size: int,
    row_splits: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune `weight` column block by column block and push each pruned weight's error
    into the columns not yet processed, weighted by the inverse Hessian (optimal brain surgeon).

    `upper` comes from `inverse_hessian_factor`. Rows are independent given the Hessian, so matrices
    that read the same input can be stacked and swept once; `row_splits` (rows per stacked matrix)
    keeps the unstructured mask chosen per matrix. Returns (fp32 weight with exact zeros, keep mask).
    """
    w = weight.to(torch.float32, copy=True)
    if pattern.is_nm and (w.shape[1] % pattern.group or block_size % pattern.group):
        raise ValueError(f"{pattern} needs in_features and block_size divisible by {pattern.group}")
    keep = torch.ones_like(w, dtype=torch.bool)
    with _one_cpu_thread(w.device):
        for start in range(0, w.shape[1], block_size):
            end = min(start + block_size, w.shape[1])
            block = (w[:, start:end], keep[:, start:end], upper[start:end, start:end])
            errors = _prune_block(*block, ratio, pattern, row_splits or [w.shape[0]])
            # The block's accumulated error reaches every later column in one matrix product.
            w[:, end:].sub_(errors @ upper[start:end, end:])
    if not torch.isfinite(w).all():
        raise HessianError("the SparseGPT update produced non-finite weights; raise prune.options.dampening")
    return w.masked_fill_(~keep, 0.0), keep


def _prune_block(
    w: torch.Tensor,
    keep: torch.Tensor,
    upper: torch.Tensor,
    ratio: float,
    pattern: Pattern,
    row_splits: Sequence[int],
) -> torch.Tensor:
    """Prune one column block in place (views of the weight and mask); return the scaled errors."""
    diag = upper.diagonal()
    errors = torch.zeros_like(w)
    if not pattern.is_nm:
        # The mask is chosen once per block and matrix, on weights corrected by the previous blocks.
        saliency = w.square() / diag.square()
        for rows, part in zip(keep.split(list(row_splits)), saliency.split(list(row_splits)), strict=True):
            rows.copy_(matrix_keep_mask(part, ratio))
    for col in range(w.shape[1]):
        if pattern.is_nm and col % pattern.group == 0:
            group = slice(col, col + pattern.group)
            keep[:, group] = nm_keep_mask(w[:, group].square() / diag[group].square(), pattern)
        kept = torch.where(keep[:, col], w[:, col], 0.0)
        error = (w[:, col] - kept) / diag[col]
        w[:, col:].addr_(error, upper[col, col:], alpha=-1.0)
        w[:, col] = kept
        errors[:, col] = error
    return errors


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run SparseGPT's column loop on one CPU thread: each step is a few small ops on (rows x block)
    tensors, too small to gain from threads, and on a busy 2-core machine the threads' synchronisation
    at every op made a 1536 x 576 matrix 3-20x slower than a single thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sparsegpt_pruned_count(rows: int, cols: int, ratio: float, block_size: int) -> int:
    """Weights SparseGPT prunes from an unstructured (rows, cols) matrix: floor(ratio * n) per block."""
    full, rest = divmod(cols, block_size)
    return full * pruned_count(rows * block_size, ratio) + pruned_count(rows * rest, ratio)
