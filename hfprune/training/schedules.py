"""Learning-rate schedules over token budgets: cosine (`budget_schedule`) and warmup-stable-decay branches.

`hfprune.training.train.training_arguments` takes a run's schedule from `schedule_args` (the `TrainingArguments`
keys max_steps, warmup_steps, lr_scheduler_type, lr_scheduler_kwargs). The train stage's kinds with
`train.schedule.type: wsd` go through `hfprune.training.branches`, which plans one stable run and its decay
branches with a `BranchPlan`; `hfprune sweep --dry-run` prints the plans (`hfprune.sweep.dry_run`).

With N_b = ceil(budget / tokens_per_step) steps for a budget, its decay takes D_b = max(1, round(decay_ratio
x N_b)) steps (rounded half up) and starts at the branch point S_b = N_b - D_b. Every step k uses
`peak x lambda(k)` of transformers' `get_wsd_schedule` (lr_scheduler_type "warmup_stable_decay"):

- warmup: k < W, from min_lr_ratio x peak towards the peak (W steps, the same for every branch);
- stable: W <= k < S_b, the peak;
- decay: S_b <= k < N_b, the step S_b + i at shape((i + 1) / D_b), so the last step, the one that spends
  the budget, runs at exactly min_lr_ratio x peak (as the cosine schedule's does).

The stable run uses the same function with a stable phase that never ends, so a branch's schedule equals
the stable run's at every step before its branch point, and the stable run trained to S and then resumed
to S' is the run trained to S' directly. The warmup is `schedule.warmup_tokens`, else warmup_ratio x the
smallest budget sharing the stable run (in a sweep, `pin_shared_warmup` writes it into every cell's
recipe), never past the first branch point.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

from hfprune import distributed, kinds
from hfprune.recipe.training import per_device_batch


WSD_SCHEDULER = "warmup_stable_decay"
NEVER = 2**62  # the stable run's stable phase: longer than any run

# Our arguments give both the stable steps and (as the Trainer always does) the total: ours are meant.
warnings.filterwarnings("ignore", message="Both num_training_steps and num_stable_steps are specified")


def tokens_per_step(spec: Any) -> int:
    """Tokens in one optimizer step of `spec` (a `TokenTraining`): global batch x seq_len."""
    user = spec.args
    per_device = per_device_batch(user)
    accumulation = int(user.get("gradient_accumulation_steps", 1))
    return per_device * accumulation * distributed.world_size() * spec.seq_len


def steps_for(budget: int, step_tokens: int) -> int:
    return math.ceil(budget / step_tokens)


def decay_steps(steps: int, decay_ratio: float) -> int:
    return max(1, math.floor(decay_ratio * steps + 0.5))


@dataclass(frozen=True)
class Branch:
    """One budget of a stable run: `steps` in all, the decay from `branch_step` to the end."""

    budget: int
    steps: int
    branch_step: int

    @property
    def decay_steps(self) -> int:
        return self.steps - self.branch_step

    def to_dict(self) -> dict[str, int]:
        return {
            "budget": self.budget,
            "steps": self.steps,
            "branch_step": self.branch_step,
            "decay_steps": self.decay_steps,
        }


@dataclass(frozen=True)
class BranchPlan:
    """One stable run and its branches (one per budget sharing it), with the schedule arguments of each."""

    tokens_per_step: int
    warmup_steps: int
    branches: tuple[Branch, ...]
    decay_shape: str
    min_lr_ratio: float

    @classmethod
    def for_budgets(cls, spec: Any, budgets: list[int], step_tokens: int | None = None) -> BranchPlan:
        """The plan of `spec` (its `schedule` and `min_lr_ratio`) for `budgets` (spec's own among them)."""
        step_tokens = step_tokens or tokens_per_step(spec)
        schedule = spec.schedule
        branches = []
        for budget in sorted(set(budgets)):
            steps = steps_for(budget, step_tokens)
            branches.append(Branch(budget, steps, steps - decay_steps(steps, schedule.decay_ratio)))
        warmup_tokens = schedule.warmup_tokens or math.ceil(spec.warmup_ratio * min(budgets))
        warmup = min(steps_for(warmup_tokens, step_tokens), min(b.branch_step for b in branches))
        return cls(step_tokens, warmup, tuple(branches), schedule.decay_shape, spec.min_lr_ratio)

    def branch(self, budget: int) -> Branch:
        found = next((b for b in self.branches if b.budget == budget), None)
        if found is None:
            raise ValueError(
                f"budget {budget} is not a branch of this plan ({[b.budget for b in self.branches]})"
            )
        return found

    @property
    def points(self) -> list[int]:
        """The branch points: the stable run's checkpoints the branches start from (step 0: no checkpoint)."""
        return sorted({b.branch_step for b in self.branches if b.branch_step})

    @property
    def stable_steps(self) -> int:
        return max(b.branch_step for b in self.branches)

    @property
    def total_tokens(self) -> int:
        """Tokens the plan trains: the stable run to its last branch point, then every decay."""
        return self.tokens_per_step * (self.stable_steps + sum(b.decay_steps for b in self.branches))

    @property
    def from_start_tokens(self) -> int:
        """Tokens of training every budget from the start instead."""
        return self.tokens_per_step * sum(b.steps for b in self.branches)

    def _kwargs(self, stable_steps: int, decay: int) -> dict[str, Any]:
        return {
            "num_stable_steps": stable_steps,
            "num_decay_steps": decay,
            "decay_type": self.decay_shape,
            "min_lr_ratio": self.min_lr_ratio,
        }

    def stable_args(self, step: int) -> dict[str, Any]:
        """`TrainingArguments` overrides of the stable run trained up to `step`; the Trainer never rotates
        its checkpoints away (`hfprune.training.branches` keeps the branch points and drops the rest)."""
        return {
            "max_steps": step,
            "warmup_steps": self.warmup_steps,
            "lr_scheduler_type": WSD_SCHEDULER,
            "lr_scheduler_kwargs": self._kwargs(NEVER, 1),
            "save_total_limit": None,
        }

    def branch_args(self, budget: int) -> dict[str, Any]:
        """`TrainingArguments` overrides of `budget`'s run: the stable run's schedule to the branch point,
        then its decay (stable steps one short, so the decay's first value is the step before the branch
        point's, the peak, and its last step reaches min_lr_ratio)."""
        branch = self.branch(budget)
        stable = branch.branch_step - self.warmup_steps - 1
        return {
            "max_steps": branch.steps,
            "warmup_steps": self.warmup_steps,
            "lr_scheduler_type": WSD_SCHEDULER,
            "lr_scheduler_kwargs": self._kwargs(stable, branch.decay_steps),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_step": self.tokens_per_step,
            "warmup_steps": self.warmup_steps,
            "stable_steps": self.stable_steps,
            "stable_tokens": self.stable_steps * self.tokens_per_step,
            "branches": [b.to_dict() for b in self.branches],
            "total_tokens": self.total_tokens,
            "from_start_tokens": self.from_start_tokens,
            "saved_tokens": self.from_start_tokens - self.total_tokens,
        }


def schedule_args(spec: Any, step_tokens: int) -> dict[str, Any]:
    """The schedule of a run trained straight through on `spec.token_budget`: the cosine of `budget_schedule`
    or, for `schedule.type: wsd`, the one branch of its own plan (what a branch of the same budget and
    warmup follows)."""
    if spec.schedule.type == "cosine":
        # Imported here: the callbacks package loads transformers, which planning a recipe never needs.
        from hfprune.callbacks.token_budget import budget_schedule

        return budget_schedule(spec.token_budget, step_tokens, spec.warmup_ratio, spec.min_lr_ratio)
    return BranchPlan.for_budgets(spec, [spec.token_budget], step_tokens).branch_args(spec.token_budget)


def stable_group(recipe: Any, kind: str, starting: str | None = None) -> str:
    """What makes `kind`'s stable run, from the recipe alone (a sweep's cells of one group share it).

    The starting model is the prune stage's inputs unless `starting` names it otherwise (a twin's
    architecture and masks); then how the kind trains, the train section but its budget and runs, the
    seed and, with learning curves, the evaluation they use.
    """
    info = kinds.get(kind)
    parts = {
        "starting": starting or recipe.fingerprint("parent", "prune", "calibration", "seed"),
        "making": str(info.making),
        "recovery": str(info.recovery),
        "train": recipe.train.model_dump(mode="json", exclude={"token_budget", "runs"}),
        "seed": recipe.seed,
        "curve": recipe.eval.model_dump(mode="json") if recipe.eval.every_tokens else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def sharing_budgets(recipe: Any, kind: str) -> list[int]:
    """The budgets of `recipe`'s trained kinds that share `kind`'s stable run (its own among them)."""
    group = stable_group(recipe, kind)
    return [recipe.token_budget(k) for k in recipe.train.runs if stable_group(recipe, k) == group]


def pin_shared_warmup(recipes: list[Any]) -> list[Any]:
    """A sweep's recipes with `train.schedule.warmup_tokens` written in where wsd leaves it unset:
    warmup_ratio x the smallest budget any of them trains, so every branch of a stable run warms up alike
    and each cell's recipe.yaml reproduces the cell alone."""
    wsd = [r for r in recipes if r.train is not None and r.train.schedule.type == "wsd"]
    if not wsd:
        return recipes
    smallest = min(r.token_budget(k) for r in wsd for k in r.train.runs)
    unset = {id(r) for r in wsd if r.train.schedule.warmup_tokens is None}
    pinned = []
    for recipe in recipes:
        tokens = math.ceil(recipe.train.warmup_ratio * smallest) if id(recipe) in unset else 0
        if tokens:  # no warmup (warmup_ratio 0) stays unset: warmup_tokens is positive
            schedule = recipe.train.schedule.model_copy(update={"warmup_tokens": tokens})
            recipe = recipe.model_copy(
                update={"train": recipe.train.model_copy(update={"schedule": schedule})}
            )
        pinned.append(recipe)
    return pinned
