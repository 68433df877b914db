"""Memory and FLOP formulas of the evaluation and training stages, for `hfprune.plan.estimate`.

Evaluation is the perplexity pass of `hfprune.eval.perplexity` (full-vocabulary logits, then cross-entropy);
training is `PruneTrainer` as `train.args` configure it (fp32 master weights, AdamW, optional bf16
autocast, gradient checkpointing and FSDP). Notation as in `hfprune.plan.terms`.
"""

from __future__ import annotations

from typing import Any

from hfprune import kinds
from hfprune.plan.hardware import GIB
from hfprune.plan.terms import (
    ADAMW_STATE_BYTES,
    TOKEN_ID_BYTES,
    Knob,
    Shape,
    StageEstimate,
    Term,
    baseline,
    logits_bytes_per_entry,
    weights,
)
from hfprune.recipe.training import per_device_batch


def eval_stage(name: str, shape: Shape, sets: list[Any], batch_size: int) -> StageEstimate | None:
    """Perplexity on every evaluation set, one batch of `batch_size` windows at a time."""
    if not sets:
        return None
    per_entry, how = logits_bytes_per_entry(shape.bytes)
    worst, worst_index = max(
        ((batch_size * s.seq_len, i) for i, s in enumerate(sets)), key=lambda x: (x[0], -x[1])
    )
    seq_len = sets[worst_index].seq_len
    activations = Term(
        "logits and loss",
        worst * shape.vocab * per_entry,
        f"B x S x V x {how} = {batch_size} x {seq_len} x {shape.vocab} x {per_entry} B",
    )
    flops, parts = 0, []
    for s in sets:
        if s.max_windows is not None:
            flops += s.max_windows * s.seq_len * shape.forward_flops(s.seq_len)
            parts.append(f"{s.max_windows} x {s.seq_len} tokens x {shape.forward_flops(s.seq_len):.4g}")
    ids = max((s.max_windows or 0) * s.seq_len for s in sets) * TOKEN_ID_BYTES
    hint = f"the weights alone need {shape.params * shape.bytes / GIB:.1f} GiB: use a device with more memory"
    return StageEstimate(
        name=name,
        device=(weights(shape), activations),
        host=(baseline(), Term("token ids", ids, "max_windows x S x 8 B (largest set)")),
        flops=flops if len(parts) == len(sets) else None,
        flops_formula=" + ".join(parts) + " FLOP per token (sum over sets: windows x S x forward)",
        compute_dtype=shape.dtype,
        knobs=(
            Knob("device", "eval.batch_size", batch_size, ("logits and loss",)),
            Knob("device", f"eval.perplexity.{worst_index}.seq_len", seq_len, ("logits and loss",)),
        ),
        fallback={"device": ("parent.dtype", hint)},
    )


# Training terms that scale with a micro-batch's tokens; how to shrink the batch and keep the run the same.
_PER_TOKEN_TERMS = ("activations", "logits and loss")
_BATCH_NOTE = " (raise gradient_accumulation_steps to keep the global batch)"


def train_stage(
    run: str, shape: Shape, train: Any, processes: int, sparse: bool, budget: int
) -> StageEstimate:
    """One training run of `budget` tokens on `processes` devices, as TrainingArguments set it."""
    args = train.args
    micro, s = per_device_batch(args), train.seq_len
    mixed = bool(args.get("bf16") or args.get("fp16"))
    a, checkpointing = 2 if mixed else 4, bool(args.get("gradient_checkpointing"))
    shards = processes if (args.get("fsdp") or args.get("deepspeed")) and processes > 1 else 1
    t, per_layer = micro * s, shape.saved_per_token_layer
    device = [
        Term(
            "weights, gradients, AdamW moments",
            shape.params * ADAMW_STATE_BYTES // shards,
            f"P x 16 B / {shards} (fp32 weight 4 + gradient 4 + two moments 8; sharded over {shards})",
        )
    ]
    if mixed:
        copies = 2 * shape.layer_params * 2 if shards > 1 else shape.params * 2
        how = "two layers gathered in bf16 (FSDP)" if shards > 1 else "P x 2 B: autocast's bf16 weight copies"
        device.append(Term("bf16 weight copies", copies, how))
    if checkpointing:
        acts = t * shape.layers * shape.hidden * a + t * per_layer * a
        formula = f"t x L x h x {a} (checkpoints) + t x {per_layer} x {a} (one layer recomputed)"
    else:
        acts = t * shape.layers * per_layer * a
        formula = f"t x L x (6h + 3q + 2kv + 4f) x {a} = {t} x {shape.layers} x {per_layer} x {a}"
    device.append(Term("activations", acts, f"{formula}; t = batch x S = {micro} x {s}"))
    per_entry, how = logits_bytes_per_entry(a)
    device.append(Term("logits and loss", t * shape.vocab * per_entry, f"t x V x {how}"))
    if sparse:
        device.append(Term("masks", shape.linear_params // shards, "linear weights x 1 B / shards"))
    return StageEstimate(
        name=f"train_{run}",
        device=tuple(device),
        host=_train_host(run, shape, processes, sparse),
        flops=(4 if checkpointing else 3) * budget * shape.forward_flops(s),
        flops_formula=f"{4 if checkpointing else 3} x token_budget ({budget:,}) x forward FLOP per token",
        compute_dtype="bfloat16" if mixed else "float32",
        processes=processes,
        knobs=(
            Knob("device", "train.args.per_device_train_batch_size", micro, _PER_TOKEN_TERMS, _BATCH_NOTE),
            Knob("device", "train.seq_len", s, _PER_TOKEN_TERMS),
        ),
        fallback=_train_fallback(checkpointing, bool(args.get("fsdp") or args.get("deepspeed"))),
    )


def _train_host(run: str, shape: Shape, processes: int, sparse: bool) -> tuple[Term, ...]:
    """Every process loads the whole model in fp32 on the host first (the scratch twin is built there
    beside it) and unpacks the masks to bool: the peak is at load time, per node."""
    twins = {kind.name for kind in kinds.made(kinds.Making.FROM_TWIN)}
    copies = 2 if run in twins else 1
    per_process = shape.params * 4 * copies + (shape.linear_params if sparse else 0)
    formula = f"{processes} processes x (P x 4 B x {copies}" + (
        " + linear weights x 1 B masks)" if sparse else ")"
    )
    return (baseline(), Term("model loaded per process", per_process * processes, formula, device_only=True))


def _train_fallback(checkpointing: bool, sharding: bool) -> dict[str, tuple[str, str]]:
    if not checkpointing:
        device = ("train.args.gradient_checkpointing", "set train.args.gradient_checkpointing: true")
    elif sharding:
        device = (
            "torchrun --nproc_per_node",
            "the recipe shards weights and optimizer states: run it under torchrun with more processes",
        )
    else:
        device = ("train.args.fsdp", "shard weights and optimizer states: train.args.fsdp under torchrun")
    host = ("torchrun --nproc_per_node", "each process loads the model in fp32: fewer processes per node")
    return {"device": device, "host": host}
