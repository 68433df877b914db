"""The vocabulary of `hfprune.plan.estimate`: a stage's estimate as named memory terms, and the model's dimensions.

`Shape` reads the dimensions from a config; `StageEstimate` holds a stage's device, host and disk terms,
its FLOPs and the knobs that shrink it. The stage formulas live in `hfprune.plan.train_eval` (evaluation,
training) and `hfprune.plan.prune_stage` (calibration and pruning). Each term says what it counts and how
(`Term.formula`), in the notation of the stage: P parameters, b bytes per weight of the dtype, N
calibration windows of S tokens in batches of B, L layers, h hidden size, q query width (heads x
head_dim), kv key/value width, f intermediate (FFN) size, V vocabulary. The terms model what the code
does today; when calibration or training change what they hold, the formula changes with them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from transformers import PretrainedConfig

from hfprune.plan.hardware import GIB


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HOST_BASELINE = GIB  # a Python process with torch and transformers imported, before any model
TOKEN_ID_BYTES = 8  # int64 token ids
ADAMW_STATE_BYTES = 16  # fp32 weight, fp32 gradient, two fp32 AdamW moments per parameter


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    formula: str
    device_only: bool = False  # a host copy that exists only because the work then moves to a device


@dataclass(frozen=True)
class Knob:
    """A recipe key whose value the named terms are proportional to (so lowering it shrinks them)."""

    where: str  # "device" or "host"
    key: str
    value: int
    terms: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class Shape:
    """The dimensions the formulas use, read from a Llama-family config."""

    layers: int
    hidden: int
    q_width: int
    kv_width: int
    ffn: int
    vocab: int
    head_dim: int
    params: int
    embedding: int
    dtype: str

    @classmethod
    def from_config(cls, config: PretrainedConfig, dtype: str) -> Shape:
        from hfprune.models.structure import count_config_parameters

        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        count = count_config_parameters(config)
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            q_width=config.num_attention_heads * head_dim,
            kv_width=config.num_key_value_heads * head_dim,
            ffn=config.intermediate_size,
            vocab=config.vocab_size,
            head_dim=head_dim,
            params=count.total,
            embedding=count.embedding,
            dtype=dtype,
        )

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def as_dtype(self, dtype: str) -> Shape:
        return replace(self, dtype=dtype)

    @property
    def matmul_params(self) -> int:
        """Parameters used in a matmul per token: non-embedding ones plus the LM head (tied or not)."""
        return self.params - self.embedding + self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: the non-embedding ones less the final norm, per layer."""
        return (self.params - self.embedding - self.hidden) // self.layers

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's linear layers (what sparse pruning masks)."""
        h, q, kv, f = self.hidden, self.q_width, self.kv_width, self.ffn
        return self.layers * (h * (q + 2 * kv) + q * h + 3 * h * f)

    @property
    def saved_per_token_layer(self) -> int:
        """Activation elements one layer keeps for backward per token: 6h (two residual streams, two
        norms' normalised and scaled outputs) + 3q + 2kv (rotated q and k, v, attention output before and
        after the head merge) + 4f (gate, up, silu(gate), their product)."""
        return 6 * self.hidden + 3 * self.q_width + 2 * self.kv_width + 4 * self.ffn

    def forward_flops(self, seq_len: int, decoder_only: bool = False) -> int:
        """FLOPs per token of one forward pass over windows of `seq_len` (causal attention)."""
        matmul = self.matmul_params - (self.vocab * self.hidden if decoder_only else 0)
        return 2 * matmul + 2 * self.layers * seq_len * self.q_width

    def gib(self) -> str:
        return f"{self.params:,} params x {self.bytes} B ({self.dtype})"


@dataclass(frozen=True)
class StageEstimate:
    name: str
    device: tuple[Term, ...] | None
    host: tuple[Term, ...]
    flops: float | None
    flops_formula: str
    compute_dtype: str
    processes: int = 1
    seconds: float | None = None
    knobs: tuple[Knob, ...] = ()
    fallback: dict[str, tuple[str, str]] = field(default_factory=dict)
    disk: tuple[Term, ...] = ()

    def terms(self, where: str) -> tuple[Term, ...] | None:
        return self.device if where == "device" else self.host

    def total(self, where: str) -> int | None:
        terms = self.terms(where)
        return None if terms is None else sum(t.bytes for t in terms)

    @property
    def time_class(self) -> str | None:
        if self.seconds is None:
            return None
        for name, limit in (("seconds", 60), ("minutes", 3600), ("hours", 86400)):
            if self.seconds < limit:
                return name
        return "days"

    def with_seconds(self, seconds: float | None) -> StageEstimate:
        return replace(self, seconds=seconds)

    def on_host_only(self) -> StageEstimate:
        """The same stage on a machine without an accelerator: the device's terms join the host's."""
        knobs = tuple(replace(k, where="host") for k in self.knobs)
        fallback = {"host": self.fallback.get("device", self.fallback.get("host", ("", "")))}
        host = tuple(t for t in self.host if not t.device_only)
        return replace(self, device=None, host=(*host, *(self.device or ())), knobs=knobs, fallback=fallback)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_bytes": self.total("device"),
            "host_bytes": self.total("host"),
            "device_terms": [asdict(t) for t in self.device] if self.device is not None else None,
            "host_terms": [asdict(t) for t in self.host],
            "disk_terms": [asdict(t) for t in self.disk],
            "flops": self.flops,
            "flops_formula": self.flops_formula,
            "compute_dtype": self.compute_dtype,
            "processes": self.processes,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "time_class": self.time_class,
        }


def baseline() -> Term:
    return Term("process baseline", HOST_BASELINE, "Python, torch, transformers (fixed)")


def weights(shape: Shape, what: str = "weights") -> Term:
    return Term(what, shape.params * shape.bytes, f"P x b = {shape.gib()}")


def logits_bytes_per_entry(b: int) -> tuple[int, str]:
    """Bytes per (token, vocab) entry while a loss is computed: the logits, their fp32 copy when they
    are not fp32 already, the shifted copy fed to cross-entropy and its log-softmax."""
    upcast = 4 if b < 4 else 0
    return b + upcast + 8, f"({b} logits{' + 4 fp32 copy' if upcast else ''} + 4 shifted + 4 log-softmax) B"
