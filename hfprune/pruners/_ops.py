"""Pure model surgery shared by pruners: no scoring, no I/O, no knowledge of recipes.

Each function takes a model (or tensors) and the decision already made (which indices to keep) and
returns the result with the config kept consistent with the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel

from hfprune.modeling import decoder_layers


def drop_layers(model: PreTrainedModel, keep: Sequence[int]) -> PreTrainedModel:
    """Keep only the decoder layers at `keep` (parent indices), in place.

    Attention modules are renumbered 0..n-1 because the KV cache is indexed by `layer_idx`; a gap
    would make generation with a cache read the wrong slots.
    """
    layers = decoder_layers(model)
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"kept layer indices must be a non-empty subset of 0..{len(layers) - 1}, got {keep}")
    kept = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index
    model.model.layers = kept
    model.config.num_hidden_layers = len(kept)
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        model.config.layer_types = [layer_types[i] for i in keep]
    return model
