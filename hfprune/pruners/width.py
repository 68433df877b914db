"""Width pruners: narrow every decoder layer by the same amount, so the result is a uniform Llama config.

`minitron_width` removes residual-stream (hidden) channels and FFN neurons and keeps every attention
head; `flap` removes whole GQA groups and FFN neurons and keeps the hidden size. Both score from
activation statistics gathered layer by layer (`calibrate.walk_layers`), take their target sizes from
the resolver in `shapes.py`, and leave the surgery to `_ops.py`; `prune_report.json` lists what was kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from transformers import PretrainedConfig, PreTrainedModel

from hfprune.calibrate import walk_layers
from hfprune.modeling import decoder_layers
from hfprune.pruners import _ops, register_pruner
from hfprune.pruners.base import Granularity, Pruner, PruneResult, PrunerOptions, TargetShape
from hfprune.pruners.shapes import RATIO_TOLERANCE, head_dim, plan_groups, plan_width


# Tokens per reduction step: a whole 8192-token window of 14336 FFN activations in float64 is ~1 GiB.
_CHUNK = 2048


class ChannelStats:
    """Running per-channel count, sum and sum of squares over every token fed to `add`.

    Sums are kept in float64 because they run over millions of tokens; each chunk is reduced in
    float32 first so the temporary copies stay small.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        for chunk in x.detach().reshape(-1, x.shape[-1]).split(_CHUNK):
            chunk = chunk.float()
            total, squares = chunk.sum(0).double(), chunk.square().sum(0).double()
            self.total = total if self.total is None else self.total + total
            self.squares = squares if self.squares is None else self.squares + squares
            self.count += chunk.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per channel (FLAP's fluctuation of an input channel)."""
        return (self.squares - self.total.square() / self.count) / max(self.count - 1, 1)


def layer_statistics(
    model: PreTrainedModel,
    calibration: torch.Tensor,
    batch_size: int,
    probes: dict[str, tuple[str, str]],
    desc: str,
) -> Iterator[dict[str, ChannelStats]]:
    """For each decoder layer in order, `ChannelStats` of every probe: name -> (submodule, "input"|"output")."""
    for step in walk_layers(model, calibration, batch_size, desc=desc):
        stats = {name: ChannelStats() for name in probes}
        handles = []
        for name, (path, where) in probes.items():
            module, stat = step.layer.get_submodule(path), stats[name]
            if where == "input":
                handles.append(module.register_forward_pre_hook(lambda _m, args, s=stat: s.add(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda _m, _a, out, s=stat: s.add(out)))
        try:
            step.forward()
        finally:
            for handle in handles:
                handle.remove()
        yield stats


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the `keep` highest scores, ascending (stable, so ties keep the earlier index)."""
    return sorted(torch.argsort(scores, descending=True, stable=True)[:keep].tolist())


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit deviation over all entries (FLAP's per-module-type standardisation)."""
    return (scores - scores.mean()) / scores.std().clamp_min(torch.finfo(scores.dtype).tiny)


def _require(calibration: torch.Tensor | None, name: str) -> torch.Tensor:
    if calibration is None:
        raise ValueError(f"{name} needs calibration tokens")
    return calibration


@dataclass
class WidthScores:
    """Minitron importances: `hidden` [hidden_size] shared by all layers, `ffn` [layers, intermediate]."""

    hidden: torch.Tensor
    ffn: torch.Tensor


@register_pruner("minitron_width")
class MinitronWidthPruner(Pruner):
    """Minitron width pruning (Muralidharan et al., 2024, arXiv 2407.14679; Sreenivas et al., 2024,
    arXiv 2408.11796): shrink the hidden size and the FFN size, keep every attention head.

    Score: activation magnitude, the sum over calibration tokens of squared activations. A hidden
    channel sums this over the outputs of every layer's input and post-attention RMSNorms (one kept set
    for the embedding, every layer, every norm and the LM head); an FFN neuron uses its own layer's
    `down_proj` input (each layer keeps its own neurons, all layers the same count). No weight update.

        prune:
          method: minitron_width
          ratio: 0.5
          options: {alignment: 64}
    """

    granularity = Granularity.WIDTH
    description = "hidden channels by norm-output activation, FFN neurons by down_proj-input activation"

    class Options(PrunerOptions):
        alignment: int = Field(64, ge=1, description="hidden and FFN sizes are multiples of this")
        ffn_ratio: float | None = Field(
            None, gt=0, description="FFN/hidden of the result (default: the parent's)"
        )
        proportion_slack: float = Field(
            0.2, ge=0, lt=1, description="allowed relative drift of FFN/hidden from its target"
        )
        ratio_tolerance: float = Field(RATIO_TOLERANCE, gt=0, lt=1)

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
        probes = {
            "attention_norm": ("input_layernorm", "output"),
            "mlp_norm": ("post_attention_layernorm", "output"),
            "ffn": ("mlp.down_proj", "input"),
        }
        hidden, ffn = 0, []
        ids = _require(calibration, "minitron_width")
        for stats in layer_statistics(model, ids, batch_size, probes, "minitron_width activations"):
            hidden = hidden + stats["attention_norm"].squares + stats["mlp_norm"].squares
            ffn.append(stats["ffn"].squares)
        return WidthScores(hidden=hidden.cpu(), ffn=torch.stack(ffn).cpu())

    def apply(self, model: PreTrainedModel, scores: WidthScores, ratio: float) -> PruneResult:
        shape = self.plan(model.config, ratio)
        changes = shape.config_changes
        hidden = top_indices(scores.hidden, changes["hidden_size"])
        ffn = [top_indices(row, changes["intermediate_size"]) for row in scores.ffn]
        for layer, neurons in zip(decoder_layers(model), ffn, strict=True):
            _ops.keep_ffn_neurons(layer.mlp, neurons)
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


@register_pruner("flap")
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

    granularity = Granularity.WIDTH
    description = "fluctuation (input variance x squared weight column norm) per KV group and FFN neuron"

    class Options(PrunerOptions):
        alignment: int = Field(64, ge=1, description="the FFN size is a multiple of this")
        kv_groups_removed: int | None = Field(
            None, ge=0, description="fix how many KV groups each layer loses"
        )
        bias_compensation: Literal["none", "attention", "mlp", "both"] = "none"
        ratio_tolerance: float = Field(RATIO_TOLERANCE, gt=0, lt=1)

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
        config = model.config
        probes = {"attention": ("self_attn.o_proj", "input"), "ffn": ("mlp.down_proj", "input")}
        groups, ffn, attention_mean, ffn_mean = [], [], [], []
        ids = _require(calibration, "flap")
        layers = decoder_layers(model)
        for index, stats in enumerate(layer_statistics(model, ids, batch_size, probes, "flap fluctuation")):
            layer = layers[index]
            channel = stats["attention"].variance * _column_norms(layer.self_attn.o_proj.weight)
            heads = channel.view(config.num_attention_heads, -1).sum(-1)
            groups.append(heads.view(config.num_key_value_heads, -1).mean(-1))
            ffn.append(stats["ffn"].variance * _column_norms(layer.mlp.down_proj.weight))
            attention_mean.append(stats["attention"].mean)
            ffn_mean.append(stats["ffn"].mean)
        groups, ffn, attention_mean, ffn_mean = (
            torch.stack(rows).cpu() for rows in (groups, ffn, attention_mean, ffn_mean)
        )
        return FlapScores(standardize(groups), standardize(ffn), attention_mean, ffn_mean)

    def apply(self, model: PreTrainedModel, scores: FlapScores, ratio: float) -> PruneResult:
        shape = self.plan(model.config, ratio)
        changes = shape.config_changes
        kept_groups, kept_ffn = [], []
        for index, layer in enumerate(decoder_layers(model)):
            groups = top_indices(scores.groups[index], changes["num_key_value_heads"])
            neurons = top_indices(scores.ffn[index], changes["intermediate_size"])
            means = (scores.attention_mean[index], scores.ffn_mean[index])
            self.prune_layer(layer, model.config, groups, neurons, means, changes)
            kept_groups.append(groups)
            kept_ffn.append(neurons)
        _ops.set_config(model, changes)
        details = {
            "kept_kv_groups": kept_groups,
            "kept_ffn_neurons": kept_ffn,
            "bias_compensation": self.options.bias_compensation,
            "attention_bias": changes["attention_bias"],
            "mlp_bias": changes["mlp_bias"],
        }
        return PruneResult(model=model, shape=shape, details=details)

    def prune_layer(
        self,
        layer: torch.nn.Module,
        config: PretrainedConfig,
        groups: list[int],
        neurons: list[int],
        means: tuple[torch.Tensor, torch.Tensor],
        changes: dict,
    ) -> None:
        """Keep `groups` and `neurons` of one decoder layer, adding biases the new config declares."""
        attention, mlp = layer.self_attn, layer.mlp
        per_group, dim = config.num_attention_heads // config.num_key_value_heads, head_dim(config)
        compensate = _COMPENSATE[self.options.bias_compensation]
        # Compensation reads the parent's full o_proj/down_proj, so it is computed before slicing.
        o_shift = down_shift = None
        if "attention" in compensate and changes["attention_bias"]:
            o_shift = _removed_mean_output(attention.o_proj, groups, per_group * dim, means[0])
        if "mlp" in compensate and changes["mlp_bias"]:
            down_shift = _removed_mean_output(mlp.down_proj, neurons, 1, means[1])
        _ops.keep_kv_groups(attention, groups, per_group, dim)
        _ops.keep_ffn_neurons(mlp, neurons)
        if changes["attention_bias"]:  # LlamaConfig's flag gives q/k/v/o all a bias; q/k/v stay zero
            _ops.add_biases((attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj), o_shift)
        if changes["mlp_bias"]:
            _ops.add_biases((mlp.gate_proj, mlp.up_proj, mlp.down_proj), down_shift)


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
