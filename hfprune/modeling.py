"""Architecture adapter: where the rest of hfprune learns what a Llama-family decoder looks like.

Pruners, calibration and the pipeline ask this module for decoder layers, parameter counts and the
supported-architecture check instead of hard-coding attribute paths, so adding a new family means
teaching this one module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from hfprune.errors import RunFailure



SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class UnsupportedArchitectureError(RunFailure, ValueError):
    """The parent is not a Llama-family decoder with the LlamaForCausalLM layout."""


def check_supported(config: PretrainedConfig) -> None:
    """Raise `UnsupportedArchitectureError` naming the architecture and what is supported."""
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    if model_type in SUPPORTED_MODEL_TYPES and all(a in SUPPORTED_ARCHITECTURES for a in architectures):
        return
    found = ", ".join(architectures) or model_type or "unknown"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {found} (model_type={model_type!r}); hfprune supports Llama-family "
        f"decoders with the {', '.join(SUPPORTED_ARCHITECTURES)} layout (model_type "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}), including tied embeddings"
    )


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks, in order."""
    return model.model.layers


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts; `embedding` counts the input embedding and, when untied, the LM head."""

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "non_embedding": self.non_embedding}


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
    """Parameters of one decoder layer of a uniform Llama config (attention, MLP, two norms)."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    attention = hidden * (q_width + 2 * kv_width) + q_width * hidden
    if getattr(config, "attention_bias", False):
        attention += q_width + 2 * kv_width + hidden
    mlp = 3 * hidden * ffn + (2 * ffn + hidden if getattr(config, "mlp_bias", False) else 0)
    return attention + mlp + 2 * hidden


def count_config_parameters(config: PretrainedConfig) -> ParamCount:
    """Parameter counts from the config alone, without building the model (for plans and dry runs)."""
    embedding = config.vocab_size * config.hidden_size
    if not getattr(config, "tie_word_embeddings", False):
        embedding *= 2
    decoder = config.num_hidden_layers * layer_parameters(config) + config.hidden_size  # + final norm
    return ParamCount(total=decoder + embedding, embedding=embedding)


def updated_config(config: PretrainedConfig, changes: dict[str, Any]) -> PretrainedConfig:
    """A copy of `config` with `changes` applied; the parent config is never mutated."""
    new = config.__class__.from_dict({**config.to_dict(), **changes})
    return new


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
