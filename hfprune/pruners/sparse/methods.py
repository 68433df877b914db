"""Sparse pruners: zero individual weights of the decoder's linear layers; every shape is unchanged.

Sits between calibration and saving. Each pruner here only says how to gather a statistic from a
linear layer's calibration inputs and how to prune one weight matrix with it; the sequential
layer-by-layer walk, the plan and the report live in `base.py`, the tensor math in
`ops.py`. The result carries keep-masks (True = keep) keyed by parameter name, which the
prune stage saves with `hfprune.masks.storage.save_masks`.
"""

from __future__ import annotations

from typing import Any

import torch

from hfprune.pruners.options import CalibratedSparseOptions, SparseGPTOptions
from hfprune.pruners.sparse.base import SparsePruner
from hfprune.pruners.sparse.ops import (
    inverse_hessian_factor,
    magnitude_mask,
    pruned_count,
    sparsegpt_prune,
    sparsegpt_pruned_count,
    wanda_mask,
)


class WandaPruner(SparsePruner):
    """Wanda (Sun et al., 2023, arXiv 2306.11695): prune by weight magnitude times input activation.

    Score: S_ij = |W_ij| * ||X_j||_2, the L2 norm of input feature j over every calibration token,
    compared within each output row (the lowest floor(d_in * ratio) of every row are zeroed), or
    within every group of M consecutive inputs of a row for N:M. Surviving weights are not changed.

        prune:
          method: wanda
          ratio: 0.5
          options:
            pattern: unstructured   # or 2:4 / 4:8 (ratio 0.5 only)
            max_activation_bytes: 4294967296   # calibration hidden states held in memory (the rest spill)
    """

    name = "wanda"
    Options = CalibratedSparseOptions

    def new_statistic(self, features: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(features, dtype=torch.float32, device=device)

    def accumulate(self, statistic: torch.Tensor, inputs: torch.Tensor) -> None:
        statistic.add_(inputs.square().sum(dim=0))

    def prune_weight(self, weight: torch.Tensor, prepared: Any, ratio: float) -> tuple[None, torch.Tensor]:
        return None, wanda_mask(weight, prepared, ratio, self.pattern)

    def pruned_unstructured(self, rows: int, cols: int, ratio: float) -> int:
        return rows * pruned_count(cols, ratio)


class SparseGPTPruner(SparsePruner):
    """SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): one-shot pruning with OBS updates.

    Score: the optimal-brain-surgeon saliency w_ij^2 / [H^-1]_jj^2, with H = X X^T the Hessian of the
    layer's calibration inputs plus dampening (1% of its mean diagonal by default), inverted in fp32.
    Columns are processed in blocks (128); each matrix's mask is chosen per block (per M-group for N:M)
    and each pruned weight's error is pushed into the weights not yet processed, so survivors change.

        prune:
          method: sparsegpt
          ratio: 0.5
          options:
            pattern: 2:4      # or unstructured / 4:8
            block_size: 128
            dampening: 0.01
            max_activation_bytes: 4294967296   # calibration hidden states held in memory (the rest spill)
    """

    name = "sparsegpt"
    Options = SparseGPTOptions

    def new_statistic(self, features: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(features, features, dtype=torch.float32, device=device)

    def accumulate(self, statistic: torch.Tensor, inputs: torch.Tensor) -> None:
        statistic.addmm_(inputs.T, inputs)

    def prepare(self, statistic: torch.Tensor | None) -> torch.Tensor:
        assert statistic is not None
        return inverse_hessian_factor(statistic, self.options.dampening)

    def prune_weight(
        self, weight: torch.Tensor, prepared: Any, ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsegpt_prune(weight, prepared, ratio, self.pattern, self.options.block_size)

    def prune_group(
        self, weights: list[torch.Tensor], prepared: Any, ratio: float
    ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        # q|k|v and gate|up share a Hessian: one column sweep over their stacked rows does the work of
        # two or three (the sweep's cost is per column, not per row), with each matrix's own mask.
        sizes = [weight.shape[0] for weight in weights]
        block = self.options.block_size
        updated, keep = sparsegpt_prune(torch.cat(weights), prepared, ratio, self.pattern, block, sizes)
        return list(zip(updated.split(sizes), keep.split(sizes), strict=True))

    def pruned_unstructured(self, rows: int, cols: int, ratio: float) -> int:
        return sparsegpt_pruned_count(rows, cols, ratio, self.options.block_size)


class MagnitudePruner(SparsePruner):
    """Magnitude pruning (Han et al., 2015, arXiv 1506.02626): the baseline with no calibration.

    Score: |W_ij|, one threshold per whole weight matrix (or the lowest M-N of every M consecutive
    inputs of a row for N:M). Surviving weights are not changed.

        prune:
          method: magnitude
          ratio: 0.5
    """

    name = "magnitude"
    needs_calibration = False

    def prune_weight(self, weight: torch.Tensor, prepared: Any, ratio: float) -> tuple[None, torch.Tensor]:
        return None, magnitude_mask(weight, ratio, self.pattern)

    def pruned_unstructured(self, rows: int, cols: int, ratio: float) -> int:
        return pruned_count(rows * cols, ratio)
