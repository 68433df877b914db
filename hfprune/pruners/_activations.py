"""Activation statistics for the width pruners: per-channel sums streamed from calibration, and ranking.

Sits between calibration (`calibrate.stream_forward`, one forward per calibration batch) and the width
pruners' scores: hooks on named submodules of every decoder layer accumulate count, sum and sum of
squares per channel, in float64 on the device the activations are computed on, without keeping the
activations. Memory is the statistics plus one batch's activations, whatever the number of windows.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hfprune.models.structure import decoder_layers
from hfprune.pruners.calibration import stream_forward


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


def stream_statistics(
    model: PreTrainedModel,
    calibration: torch.Tensor,
    batch_size: int,
    probes: dict[str, tuple[str, str]],
    desc: str,
) -> list[dict[str, ChannelStats]]:
    """Per decoder layer, `ChannelStats` of every probe: name -> (submodule path, "input"|"output").

    One streamed pass over the calibration set; each layer's statistics see the batches in order, so
    the sums are the ones a layer-by-layer walk over the same batches computes.
    """
    layers = decoder_layers(model)
    stats = [{name: ChannelStats() for name in probes} for _ in layers]
    handles = []
    for layer, layer_stats in zip(layers, stats, strict=True):
        for name, (path, where) in probes.items():
            module, stat = layer.get_submodule(path), layer_stats[name]
            if where == "input":
                handles.append(module.register_forward_pre_hook(lambda _m, args, s=stat: s.add(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda _m, _a, out, s=stat: s.add(out)))
    try:
        stream_forward(model, calibration, batch_size, desc)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the `keep` highest scores, ascending (stable, so ties keep the earlier index)."""
    return sorted(torch.argsort(scores, descending=True, stable=True)[:keep].tolist())


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit deviation over all entries (FLAP's per-module-type standardisation)."""
    return (scores - scores.mean()) / scores.std().clamp_min(torch.finfo(scores.dtype).tiny)
