"""What hfprune knows about one decoder family: names, biases, legal shapes and parameter counts.

An `ArchitectureSpec` is pure data plus the formulas that read it. Everything that touches a model's
modules by name (`pruners/_ops.py`, the width, depth and sparse pruners, the shape resolver, the
random-init twin, the sparsity masks) and everything that counts parameters from a config (plans,
`--dry-run`, reports) asks the spec of the parent's `model_type` instead of spelling names itself.
Module paths are relative to one decoder layer (`"self_attn.q_proj"`) unless they say otherwise.
Configs may be real `PretrainedConfig` objects or plain namespaces (the resolver's candidates), so
the formulas only read attributes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # the specs are read by checks that never load torch (validating a recipe)
    from torch import nn


# The config keys every supported family uses for its shape (the standard Hugging Face names).
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


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


@dataclass(frozen=True)
class BiasFlag:
    """A boolean config key that gives a set of projections a bias (all of them at once)."""

    key: str
    block: str  # "attention" or "mlp": whose output projection the flag also covers
    projections: tuple[str, ...]


@dataclass(frozen=True)
class ArchitectureSpec:
    """One `model_type`: where its modules live, which carry biases, and what shapes load.

    `hidden_divisible_by_heads`: the config class rejects a hidden size that does not divide among
    the query heads on every load (even with `head_dim` written explicitly), so hidden sizes and head
    counts are restricted to it. `head_norms` are per-head norms over `head_dim` (they must keep it).
    `per_layer_keys` are config lists with one entry per decoder layer, kept in step with the layers.
    """

    model_type: str
    causal_lm: str  # the class named in `config.architectures`
    config_class: str  # its config class, named in messages
    layers: str  # path from the causal LM to the decoder's ModuleList
    final_norm: str  # path from the causal LM to the norm after the last layer
    attention: str
    mlp: str
    layer_norms: tuple[str, ...]  # per-layer norms over the hidden size (residual-stream channels)
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    gate_proj: str
    up_proj: str
    down_proj: str
    head_norms: tuple[str, ...] = ()
    fixed_biases: tuple[str, ...] = ()  # projections that always carry a bias
    bias_flags: tuple[BiasFlag, ...] = ()
    hidden_divisible_by_heads: bool = False
    per_layer_keys: tuple[str, ...] = ()

    # -- names --------------------------------------------------------------------------------
    @property
    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        """The decoder block's projections grouped by the input they read (one statistic each)."""
        return (
            (self.q_proj, self.k_proj, self.v_proj),
            (self.o_proj,),
            (self.gate_proj, self.up_proj),
            (self.down_proj,),
        )

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    @property
    def hidden_readers(self) -> tuple[str, ...]:
        """Projections whose inputs are residual-stream channels."""
        return (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj)

    @property
    def hidden_writers(self) -> tuple[str, ...]:
        """Projections whose outputs are residual-stream channels."""
        return (self.o_proj, self.down_proj)

    def output_projection(self, block: str) -> str:
        return {"attention": self.o_proj, "mlp": self.down_proj}[block]

    def output_bias_flag(self, block: str) -> BiasFlag | None:
        """The flag whose bias covers `block`'s output projection (None: the family has none)."""
        out = self.output_projection(block)
        return next((f for f in self.bias_flags if f.block == block and out in f.projections), None)

    def can_bias_output(self, block: str) -> bool:
        """Whether the config can express a bias on `block`'s output projection (FLAP compensation)."""
        return self.output_projection(block) in self.fixed_biases or self.output_bias_flag(block) is not None

    # -- modules ------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_decoder_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, _, name = self.layers.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, layers)

    def norm_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every norm of the model: per-layer, per-head and the final one."""
        norms = [model.get_submodule(self.final_norm)]
        for layer in self.decoder_layers(model):
            norms += [layer.get_submodule(path) for path in (*self.layer_norms, *self.head_norms)]
        return norms

    # -- formulas from the config -------------------------------------------------------------
    def head_dim(self, config: Any) -> int:
        """The width of one attention head: explicit when the config writes it, else hidden / heads."""
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each projection of one decoder layer."""
        hidden, ffn, head_dim = config.hidden_size, config.intermediate_size, self.head_dim(config)
        q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        return {
            self.q_proj: (q_width, hidden),
            self.k_proj: (kv_width, hidden),
            self.v_proj: (kv_width, hidden),
            self.o_proj: (hidden, q_width),
            self.gate_proj: (ffn, hidden),
            self.up_proj: (ffn, hidden),
            self.down_proj: (hidden, ffn),
        }

    def biased_projections(self, config: Any) -> set[str]:
        """Projections that carry a bias under `config`: the fixed ones and those its flags switch on."""
        biased = set(self.fixed_biases)
        for flag in self.bias_flags:
            if getattr(config, flag.key, False):
                biased.update(flag.projections)
        return biased

    def layer_parameters(self, config: Any) -> int:
        """Parameters of one decoder layer: projections, their biases, per-layer and per-head norms."""
        shapes, biased = self.linear_shapes(config), self.biased_projections(config)
        weights = sum(out * inp for out, inp in shapes.values())
        biases = sum(out for name, (out, _) in shapes.items() if name in biased)
        norms = len(self.layer_norms) * config.hidden_size + len(self.head_norms) * self.head_dim(config)
        return weights + biases + norms

    def count_parameters(self, config: Any) -> ParamCount:
        """Whole-model counts from the config alone: layers, final norm, embedding and LM head."""
        embedding = config.vocab_size * config.hidden_size
        if not getattr(config, "tie_word_embeddings", False):
            embedding *= 2
        decoder = config.num_hidden_layers * self.layer_parameters(config) + config.hidden_size
        return ParamCount(total=decoder + embedding, embedding=embedding)

    # -- legal shapes -------------------------------------------------------------------------
    def hidden_step(self, config: Any, alignment: int) -> tuple[int, str]:
        """The grid hidden sizes live on for `alignment`, and the reason in words."""
        heads = config.num_attention_heads
        if self.hidden_divisible_by_heads:
            step = math.lcm(alignment, heads)
            why = (
                f"lcm(alignment {alignment}, num_attention_heads {heads}) = {step} ({self.config_class} "
                "requires hidden_size % num_attention_heads == 0)"
            )
            return step, why
        return alignment, f"alignment {alignment} ({self.config_class} reads head_dim from the config)"

    def heads_fit(self, hidden_size: int, num_attention_heads: int) -> bool:
        """Whether this many query heads is legal beside this hidden size."""
        return not self.hidden_divisible_by_heads or hidden_size % num_attention_heads == 0

    def shape_problem(self, parent: Any, new: Any) -> str | None:
        """Why a pruned config `new` of `parent` would not be a valid checkpoint of this family (None: valid)."""
        heads, kv_heads = new.num_attention_heads, new.num_key_value_heads
        if kv_heads < 1 or heads % kv_heads:
            return (
                f"num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}"
            )
        if not self.heads_fit(new.hidden_size, heads):
            return f"{self.config_class} requires hidden_size % num_attention_heads == 0"
        if self.head_norms and self.head_dim(new) != self.head_dim(parent):
            norms = ", ".join(self.head_norms)
            return f"{norms} are over head_dim, which must stay {self.head_dim(parent)}"
        return None
