"""Plumbing shared by the sparse pruners: plan, ratio checks, hooks, the sequential walk, masks, report.

Sits under `hfprune.pruners.sparse` (the registered pruners) and over `_sparse_math` (pure tensor
math). `SparsePruner.prune()` walks the decoder layer by layer (`hfprune.calibrate.walk_layers`):
hooks record one layer's input statistics, the layer is pruned, and it is run again so that the next
layer is calibrated on pruned outputs. Only one layer's activations and statistics are alive at a
time, so memory does not grow with depth. `score()` + `apply()` is the one-shot variant: every layer
is scored on the dense parent and the statistics of all layers are kept (on the CPU), so its memory
does grow with depth.

Ratio is the sparsity of the seven linear weights of every decoder block (q, k, v, o, gate, up,
down, named by the parent's `ArchitectureSpec`), the same in every layer; embeddings, norms, biases
and the LM head stay dense.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import PretrainedConfig, PreTrainedModel

from hfprune.architectures import ParamCount, architecture_of
from hfprune.calibrate import LayerStep, walk_layers
from hfprune.masks import sparsity_report
from hfprune.modeling import count_config_parameters, decoder_layers
from hfprune.pruners._sparse_math import HessianError, Pattern
from hfprune.pruners.base import Granularity, Pruner, PruneResult, PrunerOptions, ShapeError, TargetShape


logger = logging.getLogger(__name__)

# One statistic per group of linears that read the same input (the spec's `linear_groups`).
LayerStats = dict[str, torch.Tensor]
LinearGroups = tuple[tuple[str, ...], ...]


class SparseOptions(PrunerOptions):
    pattern: Literal["unstructured", "2:4", "4:8"] = Field(
        default="unstructured", description="unstructured, or N:M (keep N of every M inputs; ratio 0.5 only)"
    )


class SparsePruner(Pruner):
    """Shared plumbing: plan, ratio checks, hooks, the sequential walk, masks and the report.

    Subclasses say how to accumulate a statistic from a linear layer's inputs and how to prune one
    weight matrix given that statistic.
    """

    granularity = Granularity.SPARSE
    Options = SparseOptions

    @property
    def pattern(self) -> Pattern:
        return Pattern.parse(self.options.pattern)

    # -- what a subclass provides -------------------------------------------------------------
    def new_statistic(self, features: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, statistic: torch.Tensor, inputs: torch.Tensor) -> None:
        """Add a batch of inputs (fp32, tokens x features) to the statistic in place."""
        raise NotImplementedError

    def prepare(self, statistic: torch.Tensor | None) -> Any:
        """Turn a statistic into what `prune_weight` needs; done once per group sharing an input."""
        return statistic

    def prune_weight(
        self, weight: torch.Tensor, prepared: Any, ratio: float
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(updated weight, or None when survivors keep their values; keep mask)."""
        raise NotImplementedError

    def prune_group(
        self, weights: list[torch.Tensor], prepared: Any, ratio: float
    ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """Prune linears that read the same input (so share `prepared`); one matrix at a time by default."""
        return [self.prune_weight(weight, prepared, ratio) for weight in weights]

    def pruned_unstructured(self, rows: int, cols: int, ratio: float) -> int:
        """How many weights an unstructured prune removes from a (rows, cols) matrix."""
        raise NotImplementedError

    # -- ratio and plan -----------------------------------------------------------------------
    def ratio_problem(self, ratio: float) -> str | None:
        pattern = self.pattern
        if pattern.is_nm and ratio != 0 and not math.isclose(ratio, pattern.ratio):
            return (
                f"pattern {pattern} keeps {pattern.keep} of every {pattern.group} weights, so it needs ratio "
                f"{pattern.ratio:g}, got {ratio:g}; use pattern: unstructured for other ratios"
            )
        return None

    def _check_ratio(self, ratio: float) -> None:
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        problem = self.ratio_problem(ratio)
        if problem:
            raise ValueError(problem)

    def pruned_in_matrix(self, rows: int, cols: int, ratio: float) -> int:
        pattern = self.pattern
        if ratio == 0:
            return 0
        if pattern.is_nm:
            if cols % pattern.group:
                raise ShapeError(
                    f"pattern {pattern} needs in_features divisible by {pattern.group}, got {cols}"
                )
            return rows * (cols // pattern.group) * (pattern.group - pattern.keep)
        return self.pruned_unstructured(rows, cols, ratio)

    def plan(self, config: PretrainedConfig, ratio: float) -> TargetShape:
        self._check_ratio(ratio)
        before = count_config_parameters(config)
        shapes = architecture_of(config).linear_shapes(config)
        per_layer = sum(self.pruned_in_matrix(r, c, ratio) for r, c in shapes.values())
        after = ParamCount(
            total=before.total - config.num_hidden_layers * per_layer, embedding=before.embedding
        )
        return TargetShape({}, before, after, ratio)

    # -- scoring and pruning ------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self, model: PreTrainedModel, calibration: torch.Tensor | None, batch_size: int = 1
    ) -> list[LayerStats | None]:
        """Per-layer statistics of the dense model (one-shot, on the CPU); None where none are used."""
        if not self.needs_calibration:
            return [None] * len(decoder_layers(model))
        groups = architecture_of(model.config).linear_groups
        steps = walk_layers(model, self._require(calibration), batch_size, desc=f"{self.name} statistics")
        return [_to_cpu(self.collect(step, groups)) for step in steps]

    def score_for_ratios(
        self,
        model: PreTrainedModel,
        calibration: torch.Tensor | None,
        ratios: list[float],
        batch_size: int = 1,
    ) -> list[LayerStats | None] | None:
        """Shared only without calibration (magnitude): calibrated pruning is sequential, so each layer's
        statistics depend on how much of the layers before it was pruned."""
        return None if self.needs_calibration else self.score(model, calibration, batch_size)

    @torch.no_grad()
    def apply(self, model: PreTrainedModel, scores: list[LayerStats | None], ratio: float) -> PruneResult:
        self._check_ratio(ratio)
        timing: dict[str, float] = {}
        names, groups = _param_names(model), architecture_of(model.config).linear_groups
        masks: dict[str, torch.Tensor] = {}
        with _timed(timing, "pruning"):
            for layer, stats in zip(decoder_layers(model), scores, strict=True):
                masks |= self.prune_layer(layer, stats, ratio, names, groups)
        return self._result(model, masks, ratio, sequential=False, timing=timing)

    @torch.no_grad()
    def prune(
        self, model: PreTrainedModel, calibration: torch.Tensor | None, ratio: float, batch_size: int = 1
    ) -> PruneResult:
        """Sequential pruning: each layer is pruned, then re-run so the next sees pruned outputs."""
        self._check_ratio(ratio)
        start = time.perf_counter()
        if not self.needs_calibration or ratio == 0:
            result = self.apply(model, [None] * len(decoder_layers(model)), ratio)
        else:
            result = self._prune_sequentially(model, self._require(calibration), ratio, batch_size)
        result.seconds = time.perf_counter() - start
        return result

    def _prune_sequentially(
        self, model: PreTrainedModel, calibration: torch.Tensor, ratio: float, batch_size: int
    ) -> PruneResult:
        timing: dict[str, float] = {}
        names, groups = _param_names(model), architecture_of(model.config).linear_groups
        masks: dict[str, torch.Tensor] = {}
        for step in walk_layers(model, calibration, batch_size, desc=f"{self.name} sequential"):
            with _timed(timing, "statistics_forward"):
                stats = self.collect(step, groups)
            with _timed(timing, "pruning"):
                masks |= self.prune_layer(step.layer, stats, ratio, names, groups)
            del stats  # this layer's statistics die here, before the next layer's are built
            with _timed(timing, "pruned_forward"):
                step.outputs = None  # drop the dense outputs before computing the pruned ones
                step.forward()
        return self._result(model, masks, ratio, sequential=True, timing=timing)

    def collect(self, step: LayerStep, groups: LinearGroups) -> LayerStats:
        """Run the layer once with hooks; one statistic per group of linears that read the same input."""
        stats: LayerStats = {}
        handles = []
        for group in groups:
            reader = step.layer.get_submodule(group[0])
            statistic = self.new_statistic(reader.in_features, reader.weight.device)
            stats.update(dict.fromkeys(group, statistic))
            handles.append(reader.register_forward_hook(self._observer(statistic)))
        try:
            step.forward()
        finally:
            for handle in handles:
                handle.remove()
        return stats

    def _observer(self, statistic: torch.Tensor) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple, _output: Any) -> None:
            self.accumulate(statistic, args[0].reshape(-1, args[0].shape[-1]).float())

        return hook

    def prune_layer(
        self,
        layer: torch.nn.Module,
        stats: LayerStats | None,
        ratio: float,
        names: dict[int, str],
        groups: LinearGroups,
    ) -> dict[str, torch.Tensor]:
        """Prune the seven linears of one block in place; return their keep-masks (on the CPU)."""
        masks = {}
        for group in groups:
            weights = [layer.get_submodule(name).weight for name in group]
            if ratio == 0:
                masks |= {names[id(w)]: torch.ones(w.shape, dtype=torch.bool) for w in weights}
                continue
            statistic = None if stats is None else stats[group[0]].to(weights[0].device)
            try:
                pruned = self.prune_group(weights, self.prepare(statistic), ratio)
            except HessianError as err:
                raise HessianError(f"{names[id(weights[0])].removesuffix('.weight')}: {err}") from None
            for weight, (updated, keep) in zip(weights, pruned, strict=True):
                if updated is not None:
                    weight.copy_(updated)
                weight.masked_fill_(~keep, 0)
                masks[names[id(weight)]] = keep.cpu()
        return masks

    def _result(
        self,
        model: PreTrainedModel,
        masks: dict[str, torch.Tensor],
        ratio: float,
        sequential: bool,
        timing: dict,
    ) -> PruneResult:
        before = count_config_parameters(model.config)
        pruned = sum(keep.numel() - int(keep.count_nonzero()) for keep in masks.values())
        shape = TargetShape({}, before, ParamCount(before.total - pruned, before.embedding), ratio)
        report = sparsity_report(model, masks)
        logger.info(
            "%s: %s sparsity %.4f of the linear weights (%.4f of non-embedding parameters)",
            self.name,
            report["pattern"],
            report["sparsity"],
            shape.ratio_achieved,
        )
        details = {
            "pattern": str(self.pattern),
            "sequential": sequential,
            "sparsity": report,
            "timing_seconds": {key: round(value, 3) for key, value in timing.items()},
        }
        return PruneResult(model=model, shape=shape, details=details, masks=masks)

    def _require(self, calibration: torch.Tensor | None) -> torch.Tensor:
        if calibration is None:
            raise ValueError(f"{self.name} needs calibration tokens")
        return calibration


def _param_names(model: PreTrainedModel) -> dict[int, str]:
    return {id(param): name for name, param in model.named_parameters()}


def _to_cpu(stats: LayerStats) -> LayerStats:
    """Move a layer's statistics to the CPU, keeping one copy per group that shares it."""
    moved: dict[int, torch.Tensor] = {}
    for tensor in stats.values():
        if id(tensor) not in moved:
            moved[id(tensor)] = tensor.cpu()
    return {name: moved[id(tensor)] for name, tensor in stats.items()}


@contextlib.contextmanager
def _timed(totals: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # kernels are asynchronous; without this GPU work lands in the wrong bucket
    totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
