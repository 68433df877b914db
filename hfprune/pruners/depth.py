"""Depth pruners: remove whole decoder layers; the config changes only `num_hidden_layers`.

Ratio means the fraction of non-embedding parameters removed; every Llama layer has the same size,
so removing k of L layers removes k/L of the decoder (less the final norm), and the resolver picks
the k whose achieved ratio is nearest the request.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hfprune.calibrate import walk_layers
from hfprune.modeling import count_config_parameters, decoder_layers, updated_config
from hfprune.pruners import register_pruner
from hfprune.pruners._ops import drop_layers
from hfprune.pruners.base import Granularity, Pruner, PruneResult, TargetShape


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


@register_pruner("shortgpt")
class ShortGPTPruner(DepthPruner):
    """ShortGPT (Men et al., 2024, arXiv 2403.03853): remove the layers that change the residual least.

    Score: Block Influence BI_i = 1 - mean over calibration tokens of cos(h_in, h_out), the hidden
    states entering and leaving layer i. The lowest-BI layers are removed in one shot; they need not
    be contiguous.

        prune:
          method: shortgpt
          ratio: 0.5
    """

    description = "Block Influence (1 - cos(h_in, h_out)); removes the least influential layers"

    @torch.no_grad()
    def score(
        self, model: PreTrainedModel, calibration: torch.Tensor | None, batch_size: int = 1
    ) -> torch.Tensor:
        if calibration is None:
            raise ValueError("shortgpt needs calibration tokens")
        scores = torch.zeros(len(decoder_layers(model)), dtype=torch.float64)
        for step in walk_layers(model, calibration, batch_size, desc="shortgpt block influence"):
            cos_sum, tokens = 0.0, 0
            for h_in, h_out in zip(step.inputs, step.forward(), strict=True):
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                cos_sum += cos.double().sum().item()
                tokens += cos.numel()
            scores[step.index] = 1.0 - cos_sum / tokens
        return scores
