"""Mistral (`MistralForCausalLM`): the Llama layout with no biases anywhere.

`MistralConfig` declares `head_dim` (hidden / heads when unset) and does not check the hidden size
against the head count; it has no bias flags, so FLAP cannot compensate with a bias.
"""

from __future__ import annotations

from dataclasses import replace

from hfprune.architectures.llama import LLAMA
from hfprune.architectures.registry import register_architecture


MISTRAL = register_architecture(
    replace(
        LLAMA,
        model_type="mistral",
        causal_lm="MistralForCausalLM",
        config_class="MistralConfig",
        bias_flags=(),
        hidden_divisible_by_heads=False,
    )
)
