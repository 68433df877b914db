"""Pure model surgery shared by pruners: no scoring, no I/O, no knowledge of recipes.

Each function takes a model (or tensors) and the decision already made (which indices to keep) and
returns the result with the config kept consistent with the weights. Module names come from the
family's `ArchitectureSpec` (passed in, or looked up from the model's config).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from hfprune.architectures.base import ArchitectureSpec
from hfprune.architectures.registry import architecture_of


def drop_layers(model: PreTrainedModel, keep: Sequence[int]) -> PreTrainedModel:
    """Keep only the decoder layers at `keep` (parent indices), in place.

    Attention modules are renumbered 0..n-1 because the KV cache is indexed by `layer_idx`; a gap
    would make generation with a cache read the wrong slots.
    """
    spec = architecture_of(model.config)
    layers = spec.decoder_layers(model)
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"kept layer indices must be a non-empty subset of 0..{len(layers) - 1}, got {keep}")
    select_layers(model, keep)
    for new_index, layer in enumerate(spec.decoder_layers(model)):
        layer.get_submodule(spec.attention).layer_idx = new_index
    return model


def select_layers(model: PreTrainedModel, indices: Sequence[int]) -> None:
    """Keep the decoder layers at `indices` (no copies) and cut the per-layer config lists to match."""
    spec, config = architecture_of(model.config), model.config
    layers = spec.decoder_layers(model)
    spec.set_decoder_layers(model, nn.ModuleList(layers[i] for i in indices))
    config.num_hidden_layers = len(indices)
    for key in spec.per_layer_keys:
        values = getattr(config, key, None)
        if values:
            setattr(config, key, [values[i] for i in indices])


def _index(indices: Sequence[int] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long).to(like.device)


def slice_linear(
    linear: nn.Linear,
    rows: Sequence[int] | torch.Tensor | None = None,
    cols: Sequence[int] | torch.Tensor | None = None,
) -> None:
    """Keep output features `rows` and input features `cols` of `linear`, in place (None keeps all).

    New parameters replace the old ones (rather than resizing `.data`) so that nothing keeps the
    parent's full-size storage alive and optimizers built later see the true shapes.
    """
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight.index_select(0, _index(rows, weight))
        bias = None if bias is None else bias.index_select(0, _index(rows, bias))
    if cols is not None:
        weight = weight.index_select(1, _index(cols, weight))
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def add_bias(linear: nn.Linear, value: torch.Tensor | None = None) -> None:
    """Give `linear` a bias (zeros when it had none) and add `value` to it, in place."""
    if linear.bias is None:
        linear.bias = nn.Parameter(
            torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
        )
    if value is not None:
        with torch.no_grad():
            linear.bias.add_(value.to(linear.bias))


def slice_vector(module: nn.Module, indices: Sequence[int] | torch.Tensor) -> None:
    """Keep entries `indices` of a norm's weight vector, in place."""
    weight = module.weight.detach()
    module.weight = nn.Parameter(weight.index_select(0, _index(indices, weight)).contiguous())


def keep_ffn_neurons(spec: ArchitectureSpec, layer: nn.Module, neurons: Sequence[int] | torch.Tensor) -> None:
    """Keep the intermediate neurons `neurons` of one layer's gated MLP (gate/up rows, down columns)."""
    down = layer.get_submodule(spec.down_proj)
    slice_linear(layer.get_submodule(spec.gate_proj), rows=neurons)
    slice_linear(layer.get_submodule(spec.up_proj), rows=neurons)
    slice_linear(down, cols=neurons)
    layer.get_submodule(spec.mlp).intermediate_size = down.in_features


def group_channels(groups: Sequence[int], heads_per_group: int, head_dim: int) -> tuple[list[int], list[int]]:
    """(query channels, key/value channels) belonging to the KV groups `groups`, in order.

    Query heads are laid out group by group (head h belongs to KV head h // heads_per_group), which is
    how `repeat_kv` pairs them, so a group's query heads are one contiguous block.
    """
    q_width = heads_per_group * head_dim
    q = [g * q_width + c for g in sorted(groups) for c in range(q_width)]
    kv = [g * head_dim + c for g in sorted(groups) for c in range(head_dim)]
    return q, kv


def keep_kv_groups(
    spec: ArchitectureSpec, layer: nn.Module, groups: Sequence[int], heads_per_group: int, head_dim: int
) -> None:
    """Keep only the KV groups `groups` (each: one KV head and its query heads) of one layer's attention.

    Biases of q/k/v follow their rows; per-head norms are over `head_dim`, shared by every head, so
    they are untouched.
    """
    q, kv = group_channels(groups, heads_per_group, head_dim)
    slice_linear(layer.get_submodule(spec.q_proj), rows=q)
    slice_linear(layer.get_submodule(spec.k_proj), rows=kv)
    slice_linear(layer.get_submodule(spec.v_proj), rows=kv)
    slice_linear(layer.get_submodule(spec.o_proj), cols=q)


def keep_hidden_channels(model: PreTrainedModel, channels: Sequence[int] | torch.Tensor) -> None:
    """Keep the residual-stream channels `channels` everywhere they appear, in place.

    That is the embedding columns, every per-layer norm, the inputs of the projections that read the
    residual stream, the outputs of those that write it, the final norm and the LM head's inputs. A tied
    LM head is re-tied to the new embedding. Per-head norms (over head_dim) are untouched.
    """
    spec = architecture_of(model.config)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    embed.weight = nn.Parameter(
        embed.weight.detach().index_select(1, _index(channels, embed.weight)).contiguous()
    )
    embed.embedding_dim = embed.weight.shape[1]
    for layer in spec.decoder_layers(model):
        for name in spec.hidden_readers:
            slice_linear(layer.get_submodule(name), cols=channels)
        for name in spec.hidden_writers:
            slice_linear(layer.get_submodule(name), rows=channels)
        for name in spec.layer_norms:
            slice_vector(layer.get_submodule(name), channels)
        layer.hidden_size = len(channels)
        layer.get_submodule(spec.mlp).hidden_size = len(channels)
    slice_vector(model.get_submodule(spec.final_norm), channels)
    if tied:
        head.weight = embed.weight
        head.in_features = embed.embedding_dim
    elif head is not None:
        slice_linear(head, cols=channels)


def set_config(model: PreTrainedModel, changes: dict[str, Any]) -> None:
    """Write shape changes into the model's config object, which every submodule shares."""
    for key, value in changes.items():
        setattr(model.config, key, value)
