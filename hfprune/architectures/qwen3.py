"""Qwen3 (`Qwen3ForCausalLM`): the Llama layout with per-head RMSNorms on queries and keys.

`q_norm` and `k_norm` normalise each head over `head_dim` (one weight vector shared by all heads),
so removing heads or hidden channels leaves them untouched, and no pruned shape may change `head_dim`.
`Qwen3Config` writes `head_dim` explicitly (it need not be hidden / heads) and does not check the hidden
size against the head count. `attention_bias` gives q, k, v and o a bias; the MLP never has one.
`layer_types` has one entry per decoder layer.
"""

from __future__ import annotations

from dataclasses import replace

from hfprune.architectures.base import BiasFlag
from hfprune.architectures.llama import ATTENTION, LLAMA
from hfprune.architectures.registry import register_architecture


QWEN3 = register_architecture(
    replace(
        LLAMA,
        model_type="qwen3",
        causal_lm="Qwen3ForCausalLM",
        config_class="Qwen3Config",
        head_norms=("self_attn.q_norm", "self_attn.k_norm"),
        bias_flags=(BiasFlag("attention_bias", "attention", ATTENTION),),
        hidden_divisible_by_heads=False,
        per_layer_keys=("layer_types",),
    )
)
