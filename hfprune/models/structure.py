"""Model access for the rest of hfprune: decoder layers, parameter counts, config copies, the support check.

Calibration, the pipeline and the sweep call these functions instead of reaching into a model; each
one asks the architecture registry (`hfprune.architectures`) for the parent's family, so a new family
is a new spec there and nothing here changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from hfprune.architectures.base import ParamCount
from hfprune.architectures.registry import (
    architecture_of,
)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks, in order."""
    return architecture_of(model.config).decoder_layers(model)


def count_parameters(model: PreTrainedModel) -> ParamCount:
    """Count unique parameters of a built model (a tied LM head is counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        embedding += head.weight.numel()
    return ParamCount(total=total, embedding=embedding)


def layer_parameters(config: PretrainedConfig) -> int:
    """Parameters of one decoder layer of a uniform config, by its family's formula."""
    return architecture_of(config).layer_parameters(config)


def count_config_parameters(config: PretrainedConfig) -> ParamCount:
    """Parameter counts from the config alone, without building the model (for plans and dry runs)."""
    return architecture_of(config).count_parameters(config)


def updated_config(config: PretrainedConfig, changes: dict[str, Any]) -> PretrainedConfig:
    """A copy of `config` with `changes` applied; the parent config is never mutated.

    Per-layer lists the changes do not name (`layer_types`) are cut to the new layer count, so a
    depth plan validates before it is known which layers go; pruning writes the true list.
    """
    values = {**config.to_dict(), **changes}
    layers = values.get("num_hidden_layers")
    for key in architecture_of(config).per_layer_keys:
        if key not in changes and isinstance(values.get(key), list) and layers is not None:
            values[key] = values[key][:layers]
    return config.__class__.from_dict(values)


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
