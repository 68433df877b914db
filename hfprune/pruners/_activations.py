"""Activation statistics for the width pruners: per-channel sums gathered layer by layer, and ranking.

Sits between calibration (`calibrate.walk_layers`, which feeds each decoder layer its inputs) and the
width pruners' scores: hooks on named submodules of a layer accumulate count, sum and sum of squares
per channel, in float64, without keeping the activations.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from hfprune.calibrate import walk_layers


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
