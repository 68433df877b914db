"""Calibration losses of the parent with contiguous blocks of decoder layers skipped (Minitron depth).

Sits under `depth.MinitronDepthPruner.score`. For each calibration batch, one traced forward keeps the
hidden states entering every layer (`calibrate.trace_decoder`, on the model's device, one batch at a
time); a candidate block start..start+k-1 then resumes from the hidden state entering `start` and runs
only the layers after the block, so the shared prefix is computed once per batch instead of once per
candidate. The loss reads the LM head a slice of the vocabulary at a time with a running log-sum-exp:
no fp32 logits of the whole vocabulary are ever built. Each layer is called with the arguments the
parent gave it (its own mask where a family mixes attention types).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from hfprune.architectures.registry import architecture_of
from hfprune.models.structure import decoder_layers
from hfprune.pruners.calibration import batches, evaluating, run_layer, trace_decoder


# Logits computed at once (tokens x vocabulary slice): 2^26 fp32 values are 256 MiB.
LOGIT_ELEMENTS = 2**26


def chunked_nll(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, logit_elements: int = LOGIT_ELEMENTS
) -> torch.Tensor:
    """Summed next-token negative log-likelihood (float64 scalar) of `targets` [tokens] from `hidden`
    [tokens, hidden] through the linear LM `head`, a vocabulary slice at a time.

    Each slice's logits are computed in the head's dtype and reduced in fp32, as the full-vocabulary
    cross entropy of an evaluation does; only their log-sum-exp per token is kept between slices.
    """
    weight, bias = head.weight, getattr(head, "bias", None)
    vocab, tokens = weight.shape[0], hidden.shape[0]
    step = max(1, min(vocab, logit_elements // max(tokens, 1)))
    partial, picked = [], torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
    for start in range(0, vocab, step):
        end = min(start + step, vocab)
        sliced = None if bias is None else bias[start:end]
        logits = torch.nn.functional.linear(hidden, weight[start:end], sliced).float()
        partial.append(torch.logsumexp(logits, dim=-1))
        inside = (targets >= start) & (targets < end)
        index = (targets - start).clamp(0, end - start - 1)
        picked += torch.where(inside, logits.gather(1, index[:, None]).squeeze(1), 0.0)
        del logits
    total = torch.logsumexp(torch.stack(partial, dim=-1), dim=-1) if len(partial) > 1 else partial[0]
    return (total - picked).double().sum()


def _head_nll(model: PreTrainedModel, hidden: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """NLL of a batch's next tokens from the hidden states leaving the last (kept) layer."""
    norm = model.get_submodule(architecture_of(model.config).final_norm)
    states = norm(hidden[:, :-1]).reshape(-1, hidden.shape[-1])
    targets = batch[:, 1:].reshape(-1).to(states.device)
    return chunked_nll(states, model.get_output_embeddings(), targets)


def block_nlls(
    model: PreTrainedModel, calibration: torch.Tensor, batch_size: int, blocks: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, int]:
    """Summed NLL of the parent (entry 0) and of the parent without each (start, length) block (entry
    1 + i), over the calibration set; and the number of predicted tokens.

    Sums are float64 on the model's device, so no per-candidate value crosses to the host per batch.
    """
    layers = decoder_layers(model)
    totals: torch.Tensor | None = None
    tokens = 0
    with evaluating(model):
        for batch in batches(calibration, batch_size, "minitron_depth candidate blocks"):
            trace = trace_decoder(model, batch)
            values = [_head_nll(model, trace.hidden[-1], batch)]
            for start, length in blocks:
                hidden = trace.hidden[start]
                for index in range(start + length, len(layers)):
                    hidden = run_layer(layers[index], hidden, trace.kwargs[index])
                values.append(_head_nll(model, hidden, batch))
            stacked = torch.stack(values)
            if totals is None:
                totals = stacked
            else:
                totals += stacked
            tokens += batch[:, 1:].numel()
            del trace, values, stacked  # nothing of this batch outlives it
    assert totals is not None
    return totals, tokens
