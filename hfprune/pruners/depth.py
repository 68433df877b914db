"""Depth pruners: remove whole decoder layers; the config changes only `num_hidden_layers`.

Ratio means the fraction of non-embedding parameters removed; every decoder layer has the same size,
so removing k of L layers removes k/L of the decoder (less the final norm), and the resolver picks
the k whose achieved ratio is nearest the request. `shortgpt` drops the individually least influential
layers; `minitron_depth` drops the one contiguous block whose removal changes calibration perplexity least.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hfprune.models.structure import count_config_parameters, decoder_layers, updated_config
from hfprune.pruners._blocks import block_nlls
from hfprune.pruners._ops import drop_layers
from hfprune.pruners.base import Pruner, PruneResult, TargetShape
from hfprune.pruners.calibration import execution_device, layer_input, layer_output, stream_forward
from hfprune.pruners.options import Granularity, MinitronDepthOptions
from hfprune.pruners.shapes import require_within


def plan_layer_removal(config: PretrainedConfig, ratio: float) -> TargetShape:
    """The number of layers to keep whose non-embedding ratio is nearest `ratio` (at least one kept)."""
    before = count_config_parameters(config)
    layers = config.num_hidden_layers

    def shape(keep: int) -> TargetShape:
        after = count_config_parameters(updated_config(config, {"num_hidden_layers": keep}))
        return TargetShape({"num_hidden_layers": keep}, before, after, ratio)

    candidates = [shape(keep) for keep in range(1, layers + 1)]
    return min(
        candidates, key=lambda s: (abs(s.ratio_achieved - ratio), -s.config_changes["num_hidden_layers"])
    )


class DepthPruner(Pruner):
    """Shared plan/apply for depth pruners: keep the highest-scoring layers."""

    granularity = Granularity.DEPTH

    def plan(self, config: PretrainedConfig, ratio: float) -> TargetShape:
        return plan_layer_removal(config, ratio)

    def kept_layers(self, scores: torch.Tensor, keep: int) -> list[int]:
        return sorted(torch.topk(scores, keep).indices.tolist())

    def apply(self, model: PreTrainedModel, scores: torch.Tensor, ratio: float) -> PruneResult:
        shape = self.plan(model.config, ratio)
        keep = self.kept_layers(scores, shape.config_changes["num_hidden_layers"])
        model = drop_layers(model, keep)
        details = {"kept_layers": keep, "scores": [round(float(s), 6) for s in scores]}
        return PruneResult(model=model, shape=shape, details=details)


class ShortGPTPruner(DepthPruner):
    """ShortGPT (Men et al., 2024, arXiv 2403.03853): remove the layers that change the residual least.

    Score: Block Influence BI_i = 1 - mean over calibration tokens of cos(h_in, h_out), the hidden
    states entering and leaving layer i. The lowest-BI layers are removed in one shot; they need not
    be contiguous.

        prune:
          method: shortgpt
          ratio: 0.5
    """

    name = "shortgpt"

    @torch.no_grad()
    def score(
        self, model: PreTrainedModel, calibration: torch.Tensor | None, batch_size: int = 1
    ) -> torch.Tensor:
        """BI of every layer from one streamed forward per calibration batch.

        A forward hook on each layer sees its input and output on the model's device and adds the
        batch's cosines into a float64 running sum there; no hidden state is kept or copied.
        """
        if calibration is None:
            raise ValueError("shortgpt needs calibration tokens")
        layers = decoder_layers(model)
        sums = torch.zeros(len(layers), dtype=torch.float64, device=execution_device(model))
        counts = [0] * len(layers)

        def influence(index: int) -> Callable[..., None]:
            def hook(_module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
                h_in, h_out = layer_input(args, kwargs), layer_output(output)
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                sums[index] += cos.double().sum().to(sums.device)
                counts[index] += cos.numel()

            return hook

        handles = [
            layer.register_forward_hook(influence(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        try:
            stream_forward(model, calibration, batch_size, "shortgpt block influence")
        finally:
            for handle in handles:
                handle.remove()
        return 1.0 - sums.cpu() / torch.tensor(counts, dtype=torch.float64)


@dataclass
class BlockScores:
    """Calibration perplexity of the parent and of the parent without each contiguous block.

    `perplexity[length][start]` is the perplexity with layers start..start+length-1 removed.
    """

    baseline: float
    perplexity: dict[int, list[float]] = field(default_factory=dict)

    def best_start(self, length: int) -> int:
        """The start whose block changes perplexity least (|ppl - baseline|; earliest on ties)."""
        if length not in self.perplexity:
            raise ValueError(f"no scores for blocks of {length} layers (scored: {sorted(self.perplexity)})")
        values = self.perplexity[length]
        return min(range(len(values)), key=lambda i: (abs(values[i] - self.baseline), i))


class MinitronDepthPruner(DepthPruner):
    """Minitron depth pruning (Muralidharan et al., 2024, arXiv 2407.14679; Sreenivas et al., 2024,
    arXiv 2408.11796): remove one contiguous block of decoder layers.

    Score: for a block of k = L - n_keep layers, the calibration perplexity with layers i..i+k-1
    removed, for every start i in 0..L-k; the block whose perplexity is nearest the parent's (smallest
    |ppl - ppl_parent|) is removed. The `metric` option is where an lm-eval task score will slot in.

        prune:
          method: minitron_depth
          ratio: 0.5
          options: {metric: perplexity}
    """

    name = "minitron_depth"
    Options = MinitronDepthOptions

    def plan(self, config: PretrainedConfig, ratio: float) -> TargetShape:
        why = f"only whole layers can be removed ({config.num_hidden_layers} layers, at least one kept)"
        return require_within(plan_layer_removal(config, ratio), self.options.ratio_tolerance, why)

    def block_length(self, config: PretrainedConfig, ratio: float) -> int:
        return config.num_hidden_layers - self.plan(config, ratio).config_changes["num_hidden_layers"]

    @torch.no_grad()
    def score(
        self,
        model: PreTrainedModel,
        calibration: torch.Tensor | None,
        batch_size: int = 1,
        lengths: Sequence[int] | None = None,
    ) -> BlockScores:
        """Perplexities for every start of every block length in `lengths` (default: all lengths,
        the full sweep; `prune` asks only for the length its ratio needs).

        Per calibration batch, one traced forward, then each candidate resumes from the hidden state
        entering its block (`_blocks.block_nlls`: prefix reused, vocabulary in slices)."""
        if calibration is None:
            raise ValueError("minitron_depth needs calibration tokens")
        count = model.config.num_hidden_layers
        lengths = range(1, count) if lengths is None else [k for k in lengths if k > 0]
        blocks = [(start, length) for length in lengths for start in range(count - length + 1)]
        totals, tokens = block_nlls(model, calibration, batch_size, blocks)
        values = torch.exp(totals.cpu() / tokens).tolist()
        scores = BlockScores(baseline=values[0])
        for (_start, length), value in zip(blocks, values[1:], strict=True):
            scores.perplexity.setdefault(length, []).append(value)
        return scores

    def prune(
        self, model: PreTrainedModel, calibration: torch.Tensor | None, ratio: float, batch_size: int = 1
    ) -> PruneResult:
        """Score only the block length the ratio needs, then apply (a full sweep is L(L-1)/2 passes)."""
        begin = time.perf_counter()
        scores = self.score(model, calibration, batch_size, lengths=[self.block_length(model.config, ratio)])
        result = self.apply(model, scores, ratio)
        result.seconds = time.perf_counter() - begin
        return result

    def score_for_ratios(
        self,
        model: PreTrainedModel,
        calibration: torch.Tensor | None,
        ratios: list[float],
        batch_size: int = 1,
    ) -> BlockScores:
        """Every block length the ratios need, scored in one pass over the starts."""
        lengths = sorted({self.block_length(model.config, ratio) for ratio in ratios})
        return self.score(model, calibration, batch_size, lengths=lengths)

    def apply(self, model: PreTrainedModel, scores: BlockScores, ratio: float) -> PruneResult:
        shape = self.plan(model.config, ratio)
        count = model.config.num_hidden_layers
        length = count - shape.config_changes["num_hidden_layers"]
        start = scores.best_start(length) if length else count
        keep = [i for i in range(count) if not start <= i < start + length]
        details = {
            "kept_layers": keep,
            "removed_block": {"start": start, "length": length} if length else None,
            "metric": self.options.metric,
            "baseline_perplexity": round(scores.baseline, 6),
            "block_perplexity": [round(v, 6) for v in scores.perplexity.get(length, [])],
        }
        return PruneResult(model=drop_layers(model, keep), shape=shape, details=details)
