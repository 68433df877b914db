"""What the stages take from outside their own output folder: the parent, calibration tokens and scores,
a finished twin, a finished sibling's results, the figures a card shows, and the stable runs that budget
branches of a wsd schedule start from (`hfprune.training.branches`).

The stage functions (`hfprune.pipeline.stages`) never decide whether work can be shared; they ask the providers
they were handed. A single run gets `Providers()`, the defaults below: the parent is loaded once and
pruned in place, scores are computed for this run's ratio, and nothing is taken from elsewhere. A sweep
(`hfprune.sweep.runner`) hands each cell providers that share the parent, calibration tokens, scores, twins,
finished siblings' results and the stable runs of wsd schedules across the grid. Either way the stages
run the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import PreTrainedModel

from hfprune.data.texts import calibration_tokens
from hfprune.failures import translate_oom
from hfprune.hub import Parent, load_parent
from hfprune.pruners.base import Pruner
from hfprune.recipe.schema import Recipe
from hfprune.training.schedules import sharing_budgets


if TYPE_CHECKING:
    from hfprune.pipeline.workspace import Workspace


class Context(Protocol):
    """What a provider reads of the stage asking it: the run's recipe and its workspace.

    `hfprune.pipeline.stages.base.Context` is the full one; the providers need only these two, and
    naming them here keeps this module free of the stages that use it.
    """

    recipe: Recipe
    workspace: Workspace


@dataclass(frozen=True)
class Scores:
    """A pruner's importance scores, and whether other runs share them (recorded in the prune report)."""

    value: Any
    shared: bool = False


class ParentSource(Protocol):
    def get(self, recipe: Recipe) -> Parent:
        """The parent, loaded (weights and tokenizer)."""

    def model_to_prune(self, parent: Parent) -> PreTrainedModel:
        """The model the pruner may change: the parent itself, or a copy when others still need it."""


class ScoreSource(Protocol):
    def calibration(self, recipe: Recipe, tokenizer: Any) -> torch.Tensor:
        """The calibration token ids of `recipe.calibration`."""

    def scores(
        self, recipe: Recipe, pruner: Pruner, model: PreTrainedModel, calibration: torch.Tensor | None
    ) -> Scores | None:
        """Scores from which `pruner.apply` builds this run's model; None when the method's scores
        depend on the ratio being pruned (sequential sparse pruning), so only `pruner.prune` can."""


class TwinSource(Protocol):
    def take(self, ctx: Context, kind: str) -> bool:
        """Publish an identical, finished random-init twin as this run's `kind`; False if there is none."""


class DonorSource(Protocol):
    def copy_scores(self, ctx: Context, stage: str, kind: str) -> bool:
        """Record `kind`'s scores from a finished run whose `stage` had the same inputs; False if none."""

    def link_model(self, ctx: Context, stage: str, kind: str) -> bool:
        """Hard-link `kind`'s folder from a finished run whose `stage` had the same inputs; False if none."""


class FigureSource(Protocol):
    def fingerprint(self) -> str | None:
        """What the figures add to the cards' inputs (None: cards show no figures)."""

    def place(self, workspace: Workspace) -> list[str]:
        """Copy the figures into every carded model folder; their file names."""


class StableSource(Protocol):
    def folder(self, ctx: Context, key: str) -> Path:
        """Where the stable run `key` of a wsd schedule lives (`hfprune.training.branches`)."""

    def budgets(self, ctx: Context, kind: str) -> list[int]:
        """The budgets branching from `kind`'s stable run: the checkpoints it keeps."""


class LoadedParent:
    """A single run's parent: loaded on first use (a rerun with nothing to do never loads it) and pruned
    in place, so its memory is not held twice; parent_eval runs before the prune for that reason."""

    def __init__(self) -> None:
        self._parent: Parent | None = None

    def get(self, recipe: Recipe) -> Parent:
        if self._parent is None:
            with translate_oom("parent load"):  # within the stage that first needs it: its own knob
                self._parent = load_parent(recipe.parent)
        return self._parent

    def model_to_prune(self, parent: Parent) -> PreTrainedModel:
        self._parent = None  # consumed: depth pruning drops its layers in place
        return parent.model


class FreshScores:
    """Calibration tokens and scores computed for this run's own ratio."""

    def calibration(self, recipe: Recipe, tokenizer: Any) -> torch.Tensor:
        spec = recipe.calibration
        return calibration_tokens(spec.dataset, tokenizer, spec.num_samples, spec.seq_len)

    def scores(
        self, recipe: Recipe, pruner: Pruner, model: PreTrainedModel, calibration: torch.Tensor | None
    ) -> Scores | None:
        return scores_for(pruner, model, calibration, [recipe.prune.ratio], recipe, shared=False)


def scores_for(
    pruner: Pruner,
    model: PreTrainedModel,
    calibration: torch.Tensor | None,
    ratios: list[float],
    recipe: Recipe,
    *,
    shared: bool,
) -> Scores | None:
    """The pruner's scores for `ratios` (`Pruner.score_for_ratios`), or None where it cannot give them."""
    value = pruner.score_for_ratios(model, calibration, ratios, recipe.calibration.batch_size)
    return None if value is None else Scores(value, shared)


class Unshared:
    """Nothing to take from elsewhere: no twins, no donors, no figures (a single run)."""

    def take(self, ctx: Context, kind: str) -> bool:
        return False

    def copy_scores(self, ctx: Context, stage: str, kind: str) -> bool:
        return False

    def link_model(self, ctx: Context, stage: str, kind: str) -> bool:
        return False

    def fingerprint(self) -> str | None:
        return None

    def place(self, workspace: Workspace) -> list[str]:
        return []


class OwnStable:
    """A single run's stable runs: under its `.hfprune/`, branching at its own kinds' budgets."""

    def folder(self, ctx: Context, key: str) -> Path:
        return ctx.workspace.root / ".hfprune" / "stable" / key

    def budgets(self, ctx: Context, kind: str) -> list[int]:
        return sharing_budgets(ctx.recipe, kind)


@dataclass
class Providers:
    """Everything a run's stages take from outside their folder; the defaults are a single run's."""

    parent: ParentSource = field(default_factory=LoadedParent)
    scores: ScoreSource = field(default_factory=FreshScores)
    twins: TwinSource = field(default_factory=Unshared)
    donors: DonorSource = field(default_factory=Unshared)
    figures: FigureSource = field(default_factory=Unshared)
    stable: StableSource = field(default_factory=OwnStable)


def link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` into `target` (a copy where links are impossible). Outputs are
    always replaced by rename, never rewritten in place, so linked runs cannot change each other."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True)


def twin_shape(workspace: Workspace) -> tuple[dict[str, Any], str]:
    """What a random-init twin is made of besides its seed: the pruned model's config (without the keys
    that say where and by which version it was saved) and the masks' hash ("dense" without masks)."""
    config = json.loads((workspace.pruned_dir / "config.json").read_text())
    for incidental in ("_name_or_path", "transformers_version"):
        config.pop(incidental, None)
    masks = files_hash([workspace.masks_path]) if workspace.masks_path.is_file() else "dense"
    return config, masks


def files_hash(paths: list[Path]) -> str:
    """A short hash of files' names and contents (an input fingerprint for what they feed)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
