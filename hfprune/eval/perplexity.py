"""Evaluation of any model in a run (parent, pruned, later continued and scratch).

Perplexity is token-level: the held-out text is tokenized once, cut into non-overlapping windows
that each open with BOS, and the mean next-token negative log-likelihood over every predicted token
is exponentiated. The protocol (window length, stride, number of windows and tokens, BOS) is
returned beside the number, because perplexities are only comparable under the same protocol.

Each window's mean NLL is kept too (`window_nll`), with the standard error of the mean NLL over
windows (`nll_se`): the report draws error bars from them, and two models scored on the same windows
are compared window by window (paired differences, `hfprune.report.study`). A perplexity's 95%
interval is exp(nll +- 1.96 se).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from hfprune.data.texts import DatasetLike, token_stream, windows
from hfprune.models.structure import module_device


logger = logging.getLogger(__name__)


Z_95 = 1.96  # two-sided 95% quantile of the normal distribution
WINDOW_NLL_DECIMALS = 6  # per-window NLLs in metrics.json: far below any difference worth reporting


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
    window_nll: tuple[float, ...] = ()
    nll_se: float | None = None

    @property
    def interval_95(self) -> tuple[float, float] | None:
        """The perplexity's 95% interval, exp(nll +- 1.96 se); None with fewer than two windows."""
        if self.nll_se is None:
            return None
        return math.exp(self.nll - Z_95 * self.nll_se), math.exp(self.nll + Z_95 * self.nll_se)

    def to_dict(self) -> dict[str, Any]:
        """metrics.json's entry: `value` and `protocol` first (as every reader expects), then the spread."""
        data = asdict(self)
        value = data.pop("value")
        spread = {"nll_se": data.pop("nll_se"), "window_nll": list(data.pop("window_nll"))}
        interval = self.interval_95
        return {"value": value, "protocol": data, "interval_95": interval and list(interval), **spread}


def standard_error(values: list[float] | tuple[float, ...]) -> float | None:
    """Standard error of the mean of `values` (sample standard deviation / sqrt(n)); None below two."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


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
    window_sums: list[float] = []
    try:
        for chunk in tqdm(batch.split(batch_size), desc="perplexity", unit="batch", leave=False):
            chunk = chunk.to(device)
            logits = model(input_ids=chunk, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="none"
            )
            window_sums += nll.view(chunk.shape[0], -1).sum(dim=1).double().tolist()
    finally:
        model.train(was_training)
    seq_len = batch.shape[1]
    predicted = seq_len - 1  # tokens scored per window (every window has the same length)
    total_tokens = predicted * len(window_sums)
    mean_nll = sum(window_sums) / total_tokens
    window_nll = tuple(s / predicted for s in window_sums)
    return PerplexityResult(
        value=math.exp(mean_nll),
        nll=mean_nll,
        seq_len=seq_len,
        stride=seq_len - has_bos,
        windows=batch.shape[0],
        tokens=total_tokens,
        bos=has_bos,
        dataset=dataset,
        window_nll=tuple(round(v, WINDOW_NLL_DECIMALS) for v in window_nll),
        nll_se=standard_error(window_nll),
    )
