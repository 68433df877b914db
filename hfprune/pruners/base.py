"""The contract every pruner fulfils, and the small result types that cross stage boundaries.

A pruner sits between calibration and saving: `plan` turns (parent config, ratio) into a target
shape without touching weights (used by `--dry-run`), `score` reads the model and calibration
tokens without changing them, and `apply` turns scores into the pruned model. Pruners never see the
recipe, the Trainer or the Hub: options arrive as the pruner's own pydantic schema.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hfprune.architectures.base import ParamCount
from hfprune.errors import RunFailure
from hfprune.pruners.options import Granularity, PrunerOptions


class ShapeError(RunFailure, ValueError):
    """A ratio that no legal shape of this parent reaches; the message names the nearest one."""


@dataclass(frozen=True)
class TargetShape:
    """What a ratio resolves to for one parent: the config changes and the parameter counts."""

    config_changes: dict[str, Any]
    params_before: ParamCount
    params_after: ParamCount
    ratio_requested: float

    @property
    def ratio_achieved(self) -> float:
        before = self.params_before.non_embedding
        return 1.0 - self.params_after.non_embedding / before if before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_changes": self.config_changes,
            "ratio_requested": self.ratio_requested,
            "ratio_achieved": round(self.ratio_achieved, 6),
            "params_before": self.params_before.to_dict(),
            "params_after": self.params_after.to_dict(),
        }


@dataclass
class PruneResult:
    """The pruned model with everything `prune_report.json` needs to explain it."""

    model: PreTrainedModel
    shape: TargetShape
    details: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0


class Pruner(ABC):
    """Base class; subclasses set the class attributes and implement plan/score/apply."""

    name: ClassVar[str]
    granularity: ClassVar[Granularity]
    needs_calibration: ClassVar[bool] = True
    Options: ClassVar[type[PrunerOptions]] = PrunerOptions

    def __init__(self, options: PrunerOptions | None = None):
        self.options = options if options is not None else self.Options()

    def ratio_problem(self, ratio: float) -> str | None:
        """A message when this pruner cannot reach `ratio` with its options (None when it can)."""
        return self.options.ratio_problem(ratio)

    @abstractmethod
    def plan(self, config: PretrainedConfig, ratio: float) -> TargetShape:
        """Resolve the ratio to a legal target shape from the config alone (no weights)."""

    @abstractmethod
    def score(self, model: PreTrainedModel, calibration: torch.Tensor | None, batch_size: int = 1) -> Any:
        """Importance scores from the model and calibration token ids; must not modify the model."""

    @abstractmethod
    def apply(self, model: PreTrainedModel, scores: Any, ratio: float) -> PruneResult:
        """Build the pruned model from scores; may reuse (and so change) `model` to save memory."""

    def score_for_ratios(
        self,
        model: PreTrainedModel,
        calibration: torch.Tensor | None,
        ratios: list[float],
        batch_size: int = 1,
    ) -> Any | None:
        """Scores from which `apply` can build the pruned model at every ratio in `ratios`.

        A sweep scores the parent once per method and applies the scores to a copy of the parent at
        each ratio. None means the method cannot share them: what it measures depends on the ratio
        (sequential sparse pruning feeds each layer the already-pruned outputs of the one before).
        """
        return self.score(model, calibration, batch_size=batch_size)

    def prune(
        self, model: PreTrainedModel, calibration: torch.Tensor | None, ratio: float, batch_size: int = 1
    ) -> PruneResult:
        """Score then apply, timed: the whole pruning step for callers that need no intermediate."""
        start = time.perf_counter()
        scores = self.score(model, calibration, batch_size=batch_size)
        result = self.apply(model, scores, ratio)
        result.seconds = time.perf_counter() - start
        return result
