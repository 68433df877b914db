"""Qwen2 (`Qwen2ForCausalLM`): the Llama layout with biases on q, k and v, always.

The biases are not a config flag: q/k/v always carry one and o, gate, up and down never do, so a
Qwen2 config cannot express an o_proj or down_proj bias (FLAP's bias compensation). `Qwen2Config`
does not declare `head_dim`, but the model reads it when the config writes it, and nothing checks the
hidden size against the head count, so width pruning writes `head_dim` explicitly. `layer_types` has
one entry per decoder layer.
"""

from __future__ import annotations

from dataclasses import replace

from hfprune.architectures.llama import LLAMA
from hfprune.architectures.registry import register_architecture


QWEN2 = register_architecture(
    replace(
        LLAMA,
        model_type="qwen2",
        causal_lm="Qwen2ForCausalLM",
        config_class="Qwen2Config",
        fixed_biases=(LLAMA.q_proj, LLAMA.k_proj, LLAMA.v_proj),
        bias_flags=(),
        hidden_divisible_by_heads=False,
        per_layer_keys=("layer_types",),
    )
)
