"""Width pruners: narrow every decoder layer by the same amount, so the result is a uniform config.

`minitron_width` removes residual-stream (hidden) channels and FFN neurons and keeps every attention
head; `flap` removes whole GQA groups and FFN neurons and keeps the hidden size. Both score from
activation statistics streamed from one forward per calibration batch and summed on the model's device
(`_activations.stream_statistics`), take their target sizes from the resolver in `shapes.py`, and leave
the surgery to `_ops.py`; module names come from the parent's `ArchitectureSpec`. `prune_report.json`
lists what was kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hfprune.architectures.base import ArchitectureSpec
from hfprune.architectures.registry import architecture_of
from hfprune.pruners import _ops
from hfprune.pruners._activations import standardize, stream_statistics, top_indices
from hfprune.pruners.base import Pruner, PruneResult, TargetShape
from hfprune.pruners.options import FlapOptions, Granularity, MinitronWidthOptions
from hfprune.pruners.shapes import plan_groups, plan_width


def _require(calibration: torch.Tensor | None, name: str) -> torch.Tensor:
    if calibration is None:
        raise ValueError(f"{name} needs calibration tokens")
    return calibration


@dataclass
class WidthScores:
    """Minitron importances: `hidden` [hidden_size] shared by all layers, `ffn` [layers, intermediate]."""

    hidden: torch.Tensor
    ffn: torch.Tensor


class MinitronWidthPruner(Pruner):
    """Minitron width pruning (Muralidharan et al., 2024, arXiv 2407.14679; Sreenivas et al., 2024,
    arXiv 2408.11796): shrink the hidden size and the FFN size, keep every attention head.

    Score: activation magnitude, the sum over calibration tokens of squared activations. A hidden
    channel sums this over the outputs of every layer's norms (input and post-attention RMSNorms in a
    Llama block; one kept set for the embedding, every layer, every norm and the LM head); an FFN neuron
    uses its own layer's `down_proj` input (each layer keeps its own neurons, all layers the same count).
    No weight update.

        prune:
          method: minitron_width
          ratio: 0.5
          options: {alignment: 64}
    """

    name = "minitron_width"
    granularity = Granularity.WIDTH
    Options = MinitronWidthOptions

    def plan(self, config: PretrainedConfig, ratio: float) -> TargetShape:
        o = self.options
        return plan_width(
            config,
            ratio,
            alignment=o.alignment,
            ffn_ratio=o.ffn_ratio,
            slack=o.proportion_slack,
            tolerance=o.ratio_tolerance,
        )

    @torch.no_grad()
    def score(
        self, model: PreTrainedModel, calibration: torch.Tensor | None, batch_size: int = 1
    ) -> WidthScores:
        # Sum of squares over all tokens equals the authors' aggregation (mean |x| over the batch, then
        # squares summed over positions) at their batch size of 1, and does not depend on batch size.
        spec = architecture_of(model.config)
        probes = {norm: (norm, "output") for norm in spec.layer_norms}
        probes["ffn"] = (spec.down_proj, "input")
        hidden, ffn = 0, []
        ids = _require(calibration, "minitron_width")
        for stats in stream_statistics(model, ids, batch_size, probes, "minitron_width activations"):
            for norm in spec.layer_norms:
                hidden = hidden + stats[norm].squares
            ffn.append(stats["ffn"].squares)
        return WidthScores(hidden=hidden.cpu(), ffn=torch.stack(ffn).cpu())

    def apply(self, model: PreTrainedModel, scores: WidthScores, ratio: float) -> PruneResult:
        shape = self.plan(model.config, ratio)
        changes = shape.config_changes
        hidden = top_indices(scores.hidden, changes["hidden_size"])
        ffn = [top_indices(row, changes["intermediate_size"]) for row in scores.ffn]
        spec = architecture_of(model.config)
        for layer, neurons in zip(spec.decoder_layers(model), ffn, strict=True):
            _ops.keep_ffn_neurons(spec, layer, neurons)
        _ops.keep_hidden_channels(model, hidden)
        _ops.set_config(model, changes)
        details = {"kept_hidden_channels": hidden, "kept_ffn_neurons": ffn}
        return PruneResult(model=model, shape=shape, details=details)


@dataclass
class FlapScores:
    """FLAP importances (standardised per module type) and the input means used for compensation.

    `groups` [layers, kv_heads], `ffn` [layers, intermediate]; `attention_mean` is the mean o_proj
    input [layers, heads x head_dim] and `ffn_mean` the mean down_proj input [layers, intermediate].
    """

    groups: torch.Tensor
    ffn: torch.Tensor
    attention_mean: torch.Tensor
    ffn_mean: torch.Tensor


_COMPENSATE = {"none": frozenset(), "attention": frozenset({"attention"}), "mlp": frozenset({"mlp"})}
_COMPENSATE["both"] = _COMPENSATE["attention"] | _COMPENSATE["mlp"]


class FlapPruner(Pruner):
    """FLAP (An et al., 2024, arXiv 2312.11983), uniform variant: remove the same number of whole GQA
    groups and FFN neurons from every layer; the hidden size is kept.

    Score: fluctuation of an input channel, Var(x_j) x ||W[:, j]||^2 over calibration tokens, at the
    inputs of o_proj (a head sums its channels, a KV group averages its query heads) and of down_proj
    (one per neuron), standardised per module type. Optional bias compensation adds the removed
    channels' mean contribution, W[:, removed] @ mean(x_removed), as an o_proj / down_proj bias.

        prune:
          method: flap
          ratio: 0.5
          options: {bias_compensation: attention}
    """

    name = "flap"
    granularity = Granularity.WIDTH
    Options = FlapOptions

    def plan(self, config: PretrainedConfig, ratio: float) -> TargetShape:
        o = self.options
        return plan_groups(
            config,
            ratio,
            alignment=o.alignment,
            groups_removed=o.kv_groups_removed,
            compensate=_COMPENSATE[o.bias_compensation],
            tolerance=o.ratio_tolerance,
        )

    @torch.no_grad()
    def score(
        self, model: PreTrainedModel, calibration: torch.Tensor | None, batch_size: int = 1
    ) -> FlapScores:
        config, spec = model.config, architecture_of(model.config)
        probes = {"attention": (spec.o_proj, "input"), "ffn": (spec.down_proj, "input")}
        groups, ffn, attention_mean, ffn_mean = [], [], [], []
        ids = _require(calibration, "flap")
        layers = spec.decoder_layers(model)
        all_stats = stream_statistics(model, ids, batch_size, probes, "flap fluctuation")
        for layer, stats in zip(layers, all_stats, strict=True):
            weight = layer.get_submodule(spec.o_proj).weight
            channel = stats["attention"].variance * _column_norms(weight).to(stats["attention"].total.device)
            heads = channel.view(config.num_attention_heads, -1).sum(-1)
            groups.append(heads.view(config.num_key_value_heads, -1).mean(-1))
            down = _column_norms(layer.get_submodule(spec.down_proj).weight)
            ffn.append(stats["ffn"].variance * down.to(stats["ffn"].total.device))
            attention_mean.append(stats["attention"].mean)
            ffn_mean.append(stats["ffn"].mean)
        groups, ffn, attention_mean, ffn_mean = (
            torch.stack(rows).cpu() for rows in (groups, ffn, attention_mean, ffn_mean)
        )
        return FlapScores(standardize(groups), standardize(ffn), attention_mean, ffn_mean)

    def apply(self, model: PreTrainedModel, scores: FlapScores, ratio: float) -> PruneResult:
        shape = self.plan(model.config, ratio)
        changes, spec = shape.config_changes, architecture_of(model.config)
        kept_groups, kept_ffn = [], []
        for index, layer in enumerate(spec.decoder_layers(model)):
            groups = top_indices(scores.groups[index], changes["num_key_value_heads"])
            neurons = top_indices(scores.ffn[index], changes["intermediate_size"])
            means = (scores.attention_mean[index], scores.ffn_mean[index])
            self.prune_layer(spec, layer, model.config, groups, neurons, means, changes)
            kept_groups.append(groups)
            kept_ffn.append(neurons)
        _ops.set_config(model, changes)
        details = {
            "kept_kv_groups": kept_groups,
            "kept_ffn_neurons": kept_ffn,
            "bias_compensation": self.options.bias_compensation,
            **{flag.key: changes[flag.key] for flag in spec.bias_flags},
        }
        return PruneResult(model=model, shape=shape, details=details)

    def prune_layer(
        self,
        spec: ArchitectureSpec,
        layer: torch.nn.Module,
        config: PretrainedConfig,
        groups: list[int],
        neurons: list[int],
        means: tuple[torch.Tensor, torch.Tensor],
        changes: dict,
    ) -> None:
        """Keep `groups` and `neurons` of one decoder layer, adding biases the new config declares."""
        per_group, dim = config.num_attention_heads // config.num_key_value_heads, spec.head_dim(config)
        new_biases = spec.biased_projections(SimpleNamespace(**changes))
        # Compensation reads the parent's full o_proj/down_proj, so it is computed before slicing.
        shifts = {}
        for block, kept, width, mean in (
            ("attention", groups, per_group * dim, means[0]),
            ("mlp", neurons, 1, means[1]),
        ):
            output = spec.output_projection(block)
            if block in _COMPENSATE[self.options.bias_compensation] and output in new_biases:
                shifts[output] = _removed_mean_output(layer.get_submodule(output), kept, width, mean)
        _ops.keep_kv_groups(spec, layer, groups, per_group, dim)
        _ops.keep_ffn_neurons(spec, layer, neurons)
        # A flag the new config switches on gives all of its projections a bias (zero where new);
        # the output projection also receives the compensation.
        for name in spec.linears:
            if name in new_biases:
                _ops.add_bias(layer.get_submodule(name), shifts.get(name))


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each input column of a Linear weight [out, in], in float64."""
    return weight.detach().double().square().sum(0)


def _removed_mean_output(
    linear: torch.nn.Linear, kept: Sequence[int], width: int, mean: torch.Tensor
) -> torch.Tensor:
    """W[:, removed] @ mean[removed]: the mean output of the input units NOT in `kept` (`width` columns each)."""
    columns = (torch.as_tensor(kept)[:, None] * width + torch.arange(width)).flatten()
    removed = torch.ones(linear.in_features, dtype=torch.bool)
    removed[columns] = False
    weight = linear.weight.detach()[:, removed.to(linear.weight.device)].double()
    return weight @ mean[removed].to(weight)
