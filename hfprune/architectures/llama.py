"""Llama (`LlamaForCausalLM`): the layout the other families here start from.

Pre-norm decoder blocks with grouped-query attention (q/k/v/o) and a gated MLP (gate/up/down).
Biases are off unless `attention_bias` (q, k, v and o together) or `mlp_bias` (gate, up, down) is set;
`LlamaConfig` rejects a hidden size that does not divide among the query heads on every load.
"""

from __future__ import annotations

from hfprune.architectures.base import ArchitectureSpec, BiasFlag
from hfprune.architectures.registry import register_architecture


ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

LLAMA = register_architecture(
    ArchitectureSpec(
        model_type="llama",
        causal_lm="LlamaForCausalLM",
        config_class="LlamaConfig",
        layers="model.layers",
        final_norm="model.norm",
        attention="self_attn",
        mlp="mlp",
        layer_norms=("input_layernorm", "post_attention_layernorm"),
        q_proj=ATTENTION[0],
        k_proj=ATTENTION[1],
        v_proj=ATTENTION[2],
        o_proj=ATTENTION[3],
        gate_proj=MLP[0],
        up_proj=MLP[1],
        down_proj=MLP[2],
        bias_flags=(BiasFlag("attention_bias", "attention", ATTENTION), BiasFlag("mlp_bias", "mlp", MLP)),
        hidden_divisible_by_heads=True,
    )
)
