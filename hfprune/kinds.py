"""The registry of model kinds: every model a run makes or measures, and how each one is treated.

A kind is a row of `metrics.json` (`parent`, `pruned`, `continued`, `scratch`, ...), a folder under
`<output_dir>/models/`, a Hub repo, a model card and a column of every results table. The pipeline's
stage table, the Hub code, the cards, the report, the CLI and the recipe's `train.runs` read this
registry instead of naming kinds, so a new kind is one `register(ModelKind(...))` call here plus its
card template in `model_cards/`.

How a kind is made decides which stage makes it:

- `LOADED`: the parent, loaded from `recipe.parent` (no folder of ours, no card, never published);
- `PRUNED`: the one-shot pruning stage, from the parent's weights;
- `FROM_PRUNED`: trained (a `train_<kind>` stage) starting from the pruned weights;
- `FROM_TWIN`: trained starting from a random-init twin of the pruned model (same shape and masks).

How a trained kind trains is its `recovery` (`Recovery`): plain next-token loss (None), logit
distillation from the parent (`train.distill`), or LoRA adapters merged before saving (`train.lora`).
The train stage reads it; no stage names a kind.

Registry order is column order everywhere (metrics tables, cards, report).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Recovery(StrEnum):
    """How a trained kind trains, beyond plain next-token loss (`hfprune.training.recovery`)."""

    DISTILL = "distill"  # against the parent's logits (train.distill)
    LORA = "lora"  # LoRA adapters on the budget, merged into the weights (train.lora)


class Making(StrEnum):
    """How a kind's model comes to be (and so which stage makes it)."""

    LOADED = "loaded"
    PRUNED = "pruned"
    FROM_PRUNED = "trained from the pruned weights"
    FROM_TWIN = "trained from a random-init twin"


@dataclass(frozen=True)
class ModelKind:
    """One kind of model of a run.

    Attributes:
        name: Its key in metrics.json, in `train.runs` and on the command line.
        making: How it is made (see `Making`).
        summary: What it is, in words, for the legend under every results table.
        repo_suffix: Its Hub repo is `push.repo_prefix` + this suffix ("" for the headline model).
        card_template: Its card's template in `model_cards/` (without `.md`); None: no card.
        tags: Hub tags besides `hfprune`, the method and the granularity.
        has_base_model: Made from the parent's weights, so its card names the parent as `base_model`.
        published_by_default: Published by every push; otherwise only with `push.include_pruned`
            (or when the run made nothing that is published by default).
        default_run: Trained when the recipe's `train.runs` is not given (trained kinds only).
        recovery: How a trained kind trains: None (plain next-token loss) or a `Recovery`.
        budget_from_pipeline: Trains on the whole pipeline's tokens (the parent's pretraining tokens plus
            `train.token_budget`: setting 2 of the study) instead of `train.token_budget` (setting 1).
    """

    name: str
    making: Making
    summary: str
    repo_suffix: str = ""
    card_template: str | None = None
    tags: tuple[str, ...] = ()
    has_base_model: bool = False
    published_by_default: bool = False
    default_run: bool = False
    recovery: Recovery | None = None
    budget_from_pipeline: bool = False

    @property
    def setting(self) -> int | None:
        """The study's setting a trained kind's numbers belong to: 1 (same token budget as the continued
        model) or 2 (the whole pipeline's budget); None for kinds that are not trained."""
        if not self.trained:
            return None
        return 2 if self.budget_from_pipeline else 1

    @property
    def trained(self) -> bool:
        """Made by training (so a `train.runs` entry, with a `train_<name>` stage)."""
        return self.making in (Making.FROM_PRUNED, Making.FROM_TWIN)

    @property
    def folder(self) -> str | None:
        """Its folder under `<output_dir>/models/`; None for the parent, which is never saved by us."""
        return None if self.making is Making.LOADED else self.name

    @property
    def publishable(self) -> bool:
        return self.card_template is not None


class UnknownKindError(KeyError):
    """A kind the registry does not know; the message lists the known ones."""


_REGISTRY: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
    """Add a kind (after the ones already registered); its name must be new."""
    if kind.name in _REGISTRY:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests register throwaway kinds and remove them again)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> ModelKind:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownKindError(f"unknown model kind {name!r}; known kinds: {', '.join(_REGISTRY)}") from None


def all_kinds() -> list[ModelKind]:
    """Every kind, in registry (column) order."""
    return list(_REGISTRY.values())


def names() -> list[str]:
    return list(_REGISTRY)


def made(making: Making) -> list[ModelKind]:
    return [kind for kind in _REGISTRY.values() if kind.making is making]


def trained_names() -> list[str]:
    """The values `train.runs` accepts."""
    return [kind.name for kind in _REGISTRY.values() if kind.trained]


def default_runs() -> list[str]:
    """`train.runs` when a recipe does not give it."""
    return [kind.name for kind in _REGISTRY.values() if kind.trained and kind.default_run]


def recovering(recovery: Recovery) -> list[str]:
    """The kinds that train with `recovery` (so need its `train.<recovery>` settings)."""
    return [kind.name for kind in _REGISTRY.values() if kind.recovery is recovery]


def carded() -> list[ModelKind]:
    """Kinds whose folder gets a model card (all but the parent)."""
    return [kind for kind in _REGISTRY.values() if kind.card_template is not None]


def comparison() -> tuple[ModelKind, ModelKind]:
    """(headline, baseline): the first kind trained from pruned weights and the first trained from a
    random-init twin; the study's question is the gap between their scores."""
    return made(Making.FROM_PRUNED)[0], made(Making.FROM_TWIN)[0]


# The built-in kinds, in column order. A new kind is one more entry here plus its card template.
# fmt: off
PARENT = register(ModelKind("parent", Making.LOADED, "the model pruned"))
PRUNED = register(ModelKind(
    "pruned", Making.PRUNED, "the one-shot result before training",
    repo_suffix="-pruned", card_template="pruned", tags=("pruned",), has_base_model=True,
))
CONTINUED = register(ModelKind(
    "continued", Making.FROM_PRUNED, "the pruned model after training",
    card_template="continued", tags=("pruned", "continued-pretraining"), has_base_model=True,
    published_by_default=True, default_run=True,
))
SCRATCH = register(ModelKind(
    "scratch", Making.FROM_TWIN, "its random-init twin after the same training",
    repo_suffix="-scratch", card_template="scratch", tags=("random-init",),
    published_by_default=True, default_run=True,
))
# Recovery kinds: trained only when `train.runs` names them, on the same budget and tokens.
DISTILLED = register(ModelKind(
    "distilled", Making.FROM_PRUNED, "the pruned model trained against the parent's logits",
    repo_suffix="-distilled", card_template="distilled", tags=("pruned", "distillation"),
    has_base_model=True, published_by_default=True, recovery=Recovery.DISTILL,
))
LORA = register(ModelKind(
    "lora", Making.FROM_PRUNED, "the pruned model with LoRA adapters trained and merged",
    repo_suffix="-lora", card_template="lora", tags=("pruned", "lora"),
    has_base_model=True, published_by_default=True, recovery=Recovery.LORA,
))
SCRATCH_DISTILLED = register(ModelKind(
    "scratch_distilled", Making.FROM_TWIN, "the random-init twin trained against the parent's logits",
    repo_suffix="-scratch-distilled", card_template="scratch_distilled", tags=("random-init", "distillation"),
    published_by_default=True, recovery=Recovery.DISTILL,
))
# Setting 2 of the study: the twin gets the tokens of the whole pipeline (the parent's pretraining too).
SCRATCH_PIPELINE = register(ModelKind(
    "scratch_pipeline", Making.FROM_TWIN,
    "its random-init twin trained on the whole pipeline's tokens (parent pretraining + budget)",
    repo_suffix="-scratch-pipeline", card_template="scratch_pipeline", tags=("random-init", "pipeline-budget"),
    published_by_default=True, budget_from_pipeline=True,
))
# fmt: on
