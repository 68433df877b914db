"""Evaluation of any model in a run (parent, pruned, later continued and scratch).

Perplexity is token-level: the held-out text is tokenized once, cut into non-overlapping windows
that each open with BOS, and the mean next-token negative log-likelihood over every predicted token
is exponentiated. The protocol (window length, stride, number of windows and tokens, BOS) is
returned beside the number, because perplexities are only comparable under the same protocol.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from hfprune.data import DatasetLike, token_stream, windows
from hfprune.modeling import module_device


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    value: float
    nll: float
    seq_len: int
    stride: int
    windows: int
    tokens: int
    bos: bool
    dataset: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        value = data.pop("value")
        return {"value": value, "protocol": data}


def evaluation_windows(
    spec: DatasetLike, tokenizer: Any, seq_len: int, max_windows: int | None
) -> tuple[torch.Tensor, bool]:
    """The token windows a perplexity is computed on, and whether they open with BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (bos is not None)
    limit = None if max_windows is None else max_windows * body
    ids = token_stream(spec, tokenizer, limit=limit)
    batch = windows(ids, seq_len, bos, max_windows)
    if batch.shape[0] == 0:
        raise ValueError(f"evaluation dataset {spec.path!r} has fewer than {seq_len} tokens")
    return batch, bos is not None


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, batch: torch.Tensor, has_bos: bool, dataset: dict[str, Any], batch_size: int = 4
) -> PerplexityResult:
    """Token-level perplexity of `model` over the windows in `batch` ([n, seq_len] token ids)."""
    was_training = model.training
    model.eval()
    device = module_device(model)
    total_nll, total_tokens = 0.0, 0
    try:
        for chunk in tqdm(batch.split(batch_size), desc="perplexity", unit="batch", leave=False):
            chunk = chunk.to(device)
            logits = model(input_ids=chunk, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += chunk[:, 1:].numel()
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    seq_len = batch.shape[1]
    return PerplexityResult(
        value=math.exp(mean_nll),
        nll=mean_nll,
        seq_len=seq_len,
        stride=seq_len - has_bos,
        windows=batch.shape[0],
        tokens=total_tokens,
        bos=has_bos,
        dataset=dataset,
    )
