"""Logit distillation from the parent: the loss of the distilled kind in the train stage.

The train stage trains a student (the pruned model, or its random-init twin) against the parent's
next-token distribution. `DistillationLoss` is a loss hook for `hfprune.trainer.PruneTrainer(train_loss=...)`:
each training micro-batch runs the student through its (DDP-)wrapped forward and the teacher under
`torch.no_grad()` on the student's device in the training dtype, then mixes a divergence between the two
distributions with plain next-token cross-entropy (`hfprune.training.recovery.specs.DistillSpec`). Everything else
is plain training: the Trainer counts tokens from the batch before the loss runs, so the teacher's forward
never counts toward the token budget; sparse masks, budgets and resume are the `PruneTrainer`'s.

The divergence is trl's `ChunkedDivergenceFunction` (module `trl.kernels.chunked_divergence`). It
projects both models' final hidden states through their LM heads on [4096 tokens x 32768 vocabulary]
tiles (Triton kernels on GPUs, torch ops elsewhere), so neither model's full logits ([tokens x
vocabulary], 4 GiB per 8k-token sequence at a 128k vocabulary in fp32) ever exist. trl neither documents
nor exports it (`trl.kernels.__all__` lists only `ChunkedLogProbFunction`; its own wrapper,
`_chunked_divergence_loss`, is private), so hfprune treats it as private: it is imported here only, with
the version `constraints.txt` pins (trl 1.16.0), and `tests/training/recovery/test_distill.py` checks its values and
gradients against a hand-written forward KL, reverse KL and JSD, so a trl release that changes it fails
there rather than in a run. Writing an equivalent chunked kernel would duplicate a tested, FSDP2-aware
implementation for no gain. The cross-entropy term uses trl's exported `ChunkedLogProbFunction` the same
way. Models are run with `logits_to_keep=1`, so their full logits are not built there either.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainingArguments
from trl.kernels import ChunkedLogProbFunction


try:  # not exported by trl (see the module docstring); pinned by constraints.txt
    from trl.kernels.chunked_divergence import VOCAB_CHUNK_SIZE, ChunkedDivergenceFunction
except ImportError as error:  # pragma: no cover - only with a trl other than the pinned one
    raise ImportError(
        "hfprune's distillation needs trl.kernels.chunked_divergence.ChunkedDivergenceFunction (trl 1.16.0, "
        "as pinned in constraints.txt); install with `pip install -c constraints.txt -e .`"
    ) from error

from hfprune.errors import RunFailure
from hfprune.training.recovery.specs import DistillSpec


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DistillationSetupError(RunFailure, ValueError):
    """The teacher cannot teach this student (e.g. a different vocabulary); raised before the first step."""


@dataclass(frozen=True)
class LogitHead:
    """What turns a model's final hidden states into logits: `scale * (h @ weight.T + bias)`, then an
    optional `softcap * tanh(logits / softcap)` (Gemma-style; None for Llama-family models)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> LogitHead:
        """The LM head of `model` (wrappers such as DDP, `torch.compile` or PEFT looked through)."""
        inner = extract_model_from_parallel(model)
        head = inner.get_output_embeddings()
        config = inner.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        return cls(
            weight=_full(head.weight),
            bias=None if getattr(head, "bias", None) is None else _full(head.bias),
            scale=1.0 if scale is None else float(scale),
            softcap=getattr(config, "final_logit_softcapping", None),
        )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # An FSDP2-sharded head is gathered once per micro-batch (with autograd), not once per vocabulary tile.
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def next_token_labels(inputs: Mapping[str, Any]) -> torch.Tensor:
    """Labels aligned with the positions that predict them: `labels[:, 1:]` padded with -100 on the right
    (what transformers' causal-LM loss does), or the batch's own `shift_labels` when a collator made them."""
    if "shift_labels" in inputs:
        return inputs["shift_labels"]
    labels = inputs["labels"]
    return nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: LogitHead,
    teacher_head: LogitHead | None,
    labels: torch.Tensor,
    spec: DistillSpec,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """`sum over valid positions of (alpha * T^2 * divergence + (1 - alpha) * cross-entropy) / N`.

    Args:
        student_hidden: [batch, seq, hidden_s] final hidden states of the student (after the final norm).
        teacher_hidden: [batch, seq, hidden_t] the teacher's, for the same tokens (unused when alpha is 0).
        student_head, teacher_head: The LM heads; the vocabularies must match.
        labels: [batch, seq] the next token each position predicts (see `next_token_labels`); -100 marks
            positions without one (padding, the last position), which are left out.
        spec: alpha, temperature and divergence.
        num_items_in_batch: N, the valid positions of the whole accumulated (and, with
            `average_tokens_across_devices`, gathered) batch, as the Trainer counts them; without it, N is
            this micro-batch's count.
    """
    valid = labels.reshape(-1) != IGNORE_INDEX
    count = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
    if not bool(valid.any()):  # a micro-batch of padding: zero loss, still connected to the graph
        return student_hidden.sum() * 0.0
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[valid]
    total = h_s.new_zeros((), dtype=torch.float32)
    if spec.alpha > 0:
        if teacher_head is None:
            raise ValueError("a teacher head is needed when alpha > 0")
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[valid]
        total = total + spec.alpha * spec.temperature**2 * _divergence_sum(
            h_s, h_t, student_head, teacher_head, spec
        )
    if spec.alpha < 1:
        total = total + (1 - spec.alpha) * _cross_entropy_sum(h_s, labels.reshape(-1)[valid], student_head)
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def _divergence_sum(
    h_s: torch.Tensor, h_t: torch.Tensor, student: LogitHead, teacher: LogitHead, spec: DistillSpec
) -> torch.Tensor:
    divergence, _entropy = ChunkedDivergenceFunction.apply(
        h_s,
        student.weight,
        student.bias,
        h_t,
        teacher.weight,
        teacher.bias,
        spec.trl_beta,
        spec.temperature,
        student.scale,
        student.softcap,
        teacher.scale,
        teacher.softcap,
    )
    return divergence.sum()


def _cross_entropy_sum(h_s: torch.Tensor, targets: torch.Tensor, head: LogitHead) -> torch.Tensor:
    log_probs = ChunkedLogProbFunction.apply(
        h_s, head.weight, head.bias, targets, 1.0, VOCAB_CHUNK_SIZE, head.softcap, head.scale, ()
    )[0]
    return -log_probs.sum()


def final_hidden_states(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The final (normed) hidden states of a causal LM, through its wrapper's forward (so DDP and FSDP
    hooks run), with the logits of only the last position computed."""
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    outputs = model(**model_inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return outputs.hidden_states[-1]


def training_dtype(args: TrainingArguments) -> torch.dtype | None:
    """The dtype mixed-precision training computes in (`bf16`/`fp16`), or None for full precision."""
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return None


class DistillationLoss:
    """Loss hook for `PruneTrainer(train_loss=...)`: distils `teacher` into the trained model.

    The teacher is frozen and put in eval mode here; on the first micro-batch it is moved to the
    student's device and to `dtype` (the training dtype; default: the student's parameter dtype). It
    runs under `torch.no_grad()`, so it holds no activations and receives no gradients.

    Args:
        teacher: The parent, a causal LM with the student's vocabulary.
        spec: alpha, temperature and divergence (`train.distill` in a recipe).
        dtype: The dtype the teacher runs in; pass `training_dtype(args)` for mixed precision.

    Example:
        >>> loss = DistillationLoss(parent, DistillSpec(alpha=1.0), dtype=training_dtype(args))  # doctest: +SKIP
        >>> PruneTrainer(model=pruned, args=args, train_dataset=stream, train_loss=loss,
        ...              token_budget=50_000_000).train()  # doctest: +SKIP
    """

    def __init__(self, teacher: nn.Module, spec: DistillSpec, dtype: torch.dtype | None = None) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.spec = spec
        self.dtype = dtype
        self._placed_on: torch.device | None = None

    def __call__(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        student_hidden = final_hidden_states(model, inputs)
        teacher_hidden, teacher_head = student_hidden, None
        if self.spec.alpha > 0:
            self._place(model, student_hidden.device)
            with torch.no_grad():
                teacher_hidden = final_hidden_states(self.teacher, inputs)
            teacher_head = LogitHead.of(self.teacher)
        return distillation_loss(
            student_hidden,
            teacher_hidden,
            LogitHead.of(model),
            teacher_head,
            next_token_labels(inputs),
            self.spec,
            num_items_in_batch,
        )

    def _place(self, student: nn.Module, device: torch.device) -> None:
        if self._placed_on == device:
            return
        params = list(student.parameters())
        dtype = self.dtype or params[0].dtype
        self.teacher.to(device=device, dtype=dtype)
        self._placed_on = device
        student_vocab = LogitHead.of(student).weight.shape[0]
        teacher_vocab = LogitHead.of(self.teacher).weight.shape[0]
        if student_vocab != teacher_vocab:
            raise DistillationSetupError(
                f"the teacher's vocabulary ({teacher_vocab} tokens) differs from the student's ({student_vocab}); "
                "distillation needs the same tokenizer (train.distill)"
            )
        if any(isinstance(p, DTensor) for p in params) and not any(
            isinstance(p, DTensor) for p in self.teacher.parameters()
        ):
            logger.warning(
                "the student is sharded (FSDP2) but the teacher is not: every process holds a full teacher copy"
            )
        logger.info("distillation teacher on %s in %s (%s)", device, dtype, self.spec.divergence)
