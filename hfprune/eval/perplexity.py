"""Evaluation of any model in a run (parent, pruned, later continued and scratch).

Perplexity is token-level: the held-out text is tokenized once, cut into non-overlapping windows
that each open with BOS, and the mean next-token negative log-likelihood over every predicted token
is exponentiated. The protocol (window length, stride, number of windows and tokens, BOS) is
returned beside the number, because perplexities are only comparable under the same protocol.

When `max_windows` caps a set, the windows are spread evenly over its whole text (`evaluation_windows`,
`hfprune.data.texts.spread_windows`), never its head: a set whose first documents differ from the rest
would otherwise be scored on them alone. A streamed set is read up to `STREAMED_READ_MULTIPLE` x
`max_windows` windows' tokens first, and the windows spread over that. The protocol records how the
windows were chosen (`window_selection`: `all` or `spread`), the tokens they were chosen from
(`tokens_read`, with `read_limit` for a bounded read of a streamed set), and how many documents they
touch out of how many were read (`documents_covered`, `documents_total`).

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

from hfprune.data.texts import (
    STREAMED_READ_MULTIPLE,
    DatasetLike,
    document_tokens,
    documents_covered,
    spread_windows,
    windows,
)
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
    window_selection: str | None = None
    tokens_read: int | None = None
    read_limit: int | None = None
    documents_covered: int | None = None
    documents_total: int | None = None

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


@dataclass(frozen=True)
class WindowSelection:
    """How `evaluation_windows` chose its windows, for the protocol (see the module docstring)."""

    window_selection: str  # "all": every window of the text read; "spread": max_windows evenly spaced
    tokens_read: int
    read_limit: int | None  # a streamed set's bound on tokens read; None: the whole set was read
    documents_covered: int
    documents_total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluation_windows(
    spec: DatasetLike, tokenizer: Any, seq_len: int, max_windows: int | None
) -> tuple[torch.Tensor, bool, WindowSelection]:
    """The token windows a perplexity is computed on, whether they open with BOS, and how they were
    chosen (for the protocol `perplexity` records)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (bos is not None)
    streamed = bool(getattr(spec, "streaming", False))
    limit = STREAMED_READ_MULTIPLE * max_windows * body if streamed and max_windows is not None else None
    ids, starts = document_tokens(spec, tokenizer, limit=limit)
    chosen = spread_windows(len(ids) // body, max_windows)
    if not chosen:
        raise ValueError(f"evaluation dataset {spec.path!r} has fewer than {seq_len} tokens")
    spans = [(i * body, (i + 1) * body) for i in chosen]
    batch = windows([token for first, stop in spans for token in ids[first:stop]], seq_len, bos)
    selection = WindowSelection(
        window_selection="all" if len(chosen) == len(ids) // body else "spread",
        tokens_read=len(ids),
        read_limit=limit,
        documents_covered=documents_covered(starts, len(ids), spans),
        documents_total=len(starts),
    )
    return batch, bos is not None, selection


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    batch: torch.Tensor,
    has_bos: bool,
    dataset: dict[str, Any],
    batch_size: int = 4,
    selection: WindowSelection | None = None,
) -> PerplexityResult:
    """Token-level perplexity of `model` over the windows in `batch` ([n, seq_len] token ids); the
    protocol records `selection`, how `evaluation_windows` chose them."""
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
        **(selection.to_dict() if selection else {}),
    )


def perplexity_scores(model: PreTrainedModel, tokenizer: Any, spec: Any) -> dict[str, dict[str, Any]]:
    """Every perplexity set of a recipe's `eval` section (`spec`), scored on `model`: name -> result
    with its protocol (what the evaluate stage records for each model, and a sweep for its control)."""
    scores = {}
    for entry in spec.perplexity:
        batch, bos, selection = evaluation_windows(entry.dataset, tokenizer, entry.seq_len, entry.max_windows)
        dataset = entry.dataset.model_dump(mode="json", exclude_defaults=True)
        dataset["split"] = entry.dataset.split  # always recorded: the cards say where each number is from
        result = perplexity(model, batch, bos, dataset, spec.batch_size, selection=selection)
        scores[entry.name] = result.to_dict()
        logger.info("perplexity on %s: %.3f", entry.name, result.value)
    return scores
