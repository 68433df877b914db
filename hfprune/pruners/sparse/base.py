"""Plumbing shared by the sparse pruners: plan, ratio checks, hooks, the sequential walk, masks, report.

Sits under `hfprune.pruners.sparse.methods` (the registered pruners) and over `ops` (pure tensor
math). `SparsePruner.prune()` walks the decoder layer by layer (`hfprune.pruners.calibration.LayerWalk`): hooks
record one layer's input statistics, the layer is pruned, and it is run again so that the next layer
is calibrated on pruned outputs. The walk holds every calibration window's hidden state at the current
depth, at most `max_activation_bytes` of them in memory (on the model's device) and the rest spilled to
files; only one layer's statistics are alive at a time. `prune_report.json` says how much was held
(`activations`). `score()` + `apply()` is the one-shot variant: every layer is scored on the dense
parent from streamed forward passes (memory of one batch) and the statistics of all layers are kept
(on the CPU), so its memory grows with depth but not with the number of windows.

Ratio is the sparsity of the seven linear weights of every decoder block (q, k, v, o, gate, up,
down, named by the parent's `ArchitectureSpec`), the same in every layer; embeddings, norms, biases
and the LM head stay dense.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hfprune.architectures.base import ParamCount
from hfprune.architectures.registry import architecture_of
from hfprune.models.structure import count_config_parameters, decoder_layers
from hfprune.pruners.base import Pruner, PruneResult, ShapeError, TargetShape
from hfprune.pruners.calibration import LayerStep, LayerWalk, stream_forward
from hfprune.pruners.options import Granularity, Pattern, SparseOptions
from hfprune.pruners.sparse.ops import HessianError
from hfprune.pruners.sparse.report import param_names, sparse_result, stats_to_cpu, timed


# One statistic per group of linears that read the same input (the spec's `linear_groups`).
LayerStats = dict[str, torch.Tensor]
LinearGroups = tuple[tuple[str, ...], ...]


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
        """Per-layer statistics of the dense model (one-shot, on the CPU); None where none are used.

        One streamed forward per calibration batch; hooks on every layer accumulate on the device.
        """
        layers = decoder_layers(model)
        if not self.needs_calibration:
            return [None] * len(layers)
        groups = architecture_of(model.config).linear_groups
        stats: list[LayerStats] = [{} for _ in layers]
        handles = [
            layer.get_submodule(group[0]).register_forward_hook(self._lazy_observer(layer_stats, group))
            for layer, layer_stats in zip(layers, stats, strict=True)
            for group in groups
        ]
        try:
            stream_forward(model, self._require(calibration), batch_size, f"{self.name} statistics")
        finally:
            for handle in handles:
                handle.remove()
        return [stats_to_cpu(layer_stats) for layer_stats in stats]

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
        names, groups = param_names(model), architecture_of(model.config).linear_groups
        masks: dict[str, torch.Tensor] = {}
        with timed(timing, "pruning"):
            for layer, stats in zip(decoder_layers(model), scores, strict=True):
                masks |= self.prune_layer(layer, stats, ratio, names, groups)
        return sparse_result(self.name, self.pattern, model, masks, ratio, sequential=False, timing=timing)

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
        names, groups = param_names(model), architecture_of(model.config).linear_groups
        masks: dict[str, torch.Tensor] = {}
        budget = getattr(self.options, "max_activation_bytes", None)
        walk = LayerWalk(model, calibration, batch_size, f"{self.name} sequential", budget)
        for step in walk:
            with timed(timing, "statistics_forward"):
                stats = self.collect(step, groups)
            with timed(timing, "pruning"):
                masks |= self.prune_layer(step.layer, stats, ratio, names, groups)
            del stats  # this layer's statistics die here, before the next layer's are built
        timing["pruned_forward"] = walk.advance_seconds  # each pruned layer's outputs, for the next
        result = sparse_result(self.name, self.pattern, model, masks, ratio, sequential=True, timing=timing)
        result.details["activations"] = walk.report
        return result

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

    def _lazy_observer(self, stats: LayerStats, group: tuple[str, ...]) -> Callable[..., None]:
        """A hook creating the group's statistic on its first input, where that input is computed."""

        def hook(module: torch.nn.Module, args: tuple, _output: Any) -> None:
            if group[0] not in stats:
                stats.update(dict.fromkeys(group, self.new_statistic(module.in_features, args[0].device)))
            self.accumulate(stats[group[0]], args[0].reshape(-1, args[0].shape[-1]).float())

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

    def _require(self, calibration: torch.Tensor | None) -> torch.Tensor:
        if calibration is None:
            raise ValueError(f"{self.name} needs calibration tokens")
        return calibration
