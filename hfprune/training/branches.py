"""Budget branches: the train stage's kinds with `train.schedule.type: wsd` (warmup-stable-decay).

One stable run per model (same starting weights, data, seed and schedule settings) trains at the peak
learning rate for as long as the branches need; each budget is a decay branch that resumes from the
stable run's checkpoint at its branch point and ends exactly at its budget (`hfprune.training.schedules` has the
math). A sweep over budgets then costs the largest budget plus the decays, not the sum of the budgets.

`train_branch` is what `hfprune.pipeline.stages.train` calls for a wsd kind. Its branch resumes from its own work
folder's checkpoint when there is one (a kill during the decay), else from the stable run's checkpoint at
its branch point, which `StableRun.extend_to` makes if needed: the stable run resumes from its latest
checkpoint at or before that point (the schedule is constant there, so training to S then to S' is
training to S' directly), saves a checkpoint at every branch point it passes, and keeps only those and
its newest one. Where a stable run lives and which budgets branch from it come from the run's providers
(`Providers.stable`: a single run's own `.hfprune/stable/`, or the sweep folder's, shared by its cells).
A branch releases its point once trained; a stable run whose points are all released is removed.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from hfprune import distributed, kinds
from hfprune._faults import kill_point
from hfprune.outputs import output_lock, read_json, write_json
from hfprune.pipeline.providers import twin_shape
from hfprune.seeds import Role, role_seed
from hfprune.training.checkpoints import COMPLETE_MARKER, last_complete_checkpoint
from hfprune.training.schedules import BranchPlan, stable_group
from hfprune.training.train import HeldOutCurveCallback, train_model, training_work_dir


if TYPE_CHECKING:
    from hfprune.pipeline.stages.base import Context

RELEASED = "released.json"  # the branch points whose branches are trained


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def complete_checkpoints(folder: Path) -> dict[int, Path]:
    """The complete checkpoints of a Trainer output folder by step (incomplete ones are deleted)."""
    last_complete_checkpoint(folder)
    found = folder.glob("checkpoint-*") if folder.is_dir() else []
    return {checkpoint_step(p): p for p in found if (p / COMPLETE_MARKER).is_file()}


def drop_checkpoints(folder: Path, keep: set[int]) -> None:
    """Remove the complete checkpoints of `folder` but those at `keep` and the newest (main process)."""
    found = complete_checkpoints(folder)
    if distributed.is_main_process():
        for step in sorted(found)[:-1]:
            if step not in keep:
                shutil.rmtree(found[step], ignore_errors=True)


class ResumedPhase(TrainerCallback):
    """A phase that may resume another phase's checkpoint (the stable run extended, a branch from it).

    The restored state belongs to the earlier phase: its epoch (1.0 at its last step, which would read
    as a second pass over the data), its logging and save intervals, and the optimizer's learning rate
    for the next step, which the earlier phase's schedule set. Each becomes this phase's own.
    """

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        state.epoch = state.global_step / state.max_steps if state.max_steps else 0.0
        state.compute_steps(args, state.max_steps)
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if not state.global_step or optimizer is None or not hasattr(scheduler, "lr_lambdas"):
            return
        # Take the restored step again under this phase's schedule: step() sets every group's rate to
        # base_lr * lambda(step) and records it for get_last_lr(), which the Trainer logs.
        scheduler.last_epoch -= 1
        scheduler.step()


class StepKillPoint(TrainerCallback):
    """A test-only kill point (`hfprune._faults`) after every optimizer step of a phase."""

    def __init__(self, point: str) -> None:
        self.point = point

    def on_step_end(self, args, state, control, **kwargs):
        kill_point(self.point)


class BranchPoints(StepKillPoint):
    """The stable run's checkpoints: one at every branch point still needed, the newest, and no other."""

    def __init__(self, points: list[int]) -> None:
        super().__init__("stable_step")
        self.points = set(points)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.points:
            control.should_save = True
        super().on_step_end(args, state, control, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        drop_checkpoints(Path(args.output_dir), self.points)


class MilestonesOnly(HeldOutCurveCallback):
    """The learning curve of a stable run: its token milestones, not where this extension happens to end
    (a branch's curve is then the same whatever order the stable run was extended in)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        return None


class StableRun:
    """One model's stable phase: a folder of checkpoints, trained further on demand, one writer at a time
    (the folder's `output_lock`)."""

    def __init__(self, folder: Path, plan: BranchPlan) -> None:
        self.folder, self.plan = folder, plan
        self.checkpoints = folder / "checkpoints"

    def pending(self) -> list[int]:
        """The branch points whose branches are not trained yet."""
        released = set(read_json(self.folder / RELEASED, []))
        return [point for point in self.plan.points if point not in released]

    def extend_to(self, step: int, train: Callable[[Path, Path | None, list[int], int], Any]) -> Path | None:
        """The checkpoint at `step` (None at step 0: the starting model), trained first if needed by
        `train(work_dir, start, keep, step)`: from the latest checkpoint before it, in a replay folder
        when the stable run has gone past it already (then moved beside the others)."""
        if step == 0:
            return None
        if distributed.is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        with output_lock(self.folder):
            done = complete_checkpoints(self.checkpoints)
            replay = self.folder / f"replay-{step}"
            if step not in done and max(done, default=0) < step:
                train(self.folder, None, self.pending(), step)
            elif step not in done:
                start = max((s for s in done if s < step), default=None)
                train(replay, done.get(start), self.pending(), step)
                if distributed.is_main_process():
                    (replay / "checkpoints" / f"checkpoint-{step}").rename(
                        self.checkpoints / f"checkpoint-{step}"
                    )
            if distributed.is_main_process():
                shutil.rmtree(replay, ignore_errors=True)
            drop_checkpoints(self.checkpoints, set(self.pending()))
        distributed.barrier()
        return self.checkpoints / f"checkpoint-{step}"

    def release(self, step: int) -> None:
        """`step`'s branch is trained: its checkpoint goes unless it is the newest; when every branch point is
        released, the whole stable run goes."""
        if step and distributed.is_main_process() and self.folder.is_dir():
            with output_lock(self.folder):
                released = sorted({*read_json(self.folder / RELEASED, []), step})
                if set(self.plan.points) <= set(released):
                    shutil.rmtree(self.folder, ignore_errors=True)
                else:
                    write_json(self.folder / RELEASED, released)
                    drop_checkpoints(self.checkpoints, set(self.pending()))
        distributed.barrier()


def starting_identity(ctx: Context, kind: str) -> str | None:
    """A random-init twin's starting weights by what makes them (architecture, masks, twin seed), so the
    twins of methods that give one shape share a stable run; None where the prune stage's inputs say it
    (the pruned weights, or a twin that keeps the parent's embeddings and norms)."""
    spec, ws = ctx.recipe.train, ctx.workspace
    if kinds.get(kind).making is not kinds.Making.FROM_TWIN or not spec.reinit_embeddings_and_norms:
        return None
    config, masks = twin_shape(ws)
    return json.dumps([config, masks, role_seed(ctx.recipe.seed, Role.TWIN_INIT)], sort_keys=True)


def stable_key(ctx: Context, kind: str, plan: BranchPlan) -> str:
    """What makes `kind`'s stable run: its starting model, how it trains, the warmup and step size."""
    group = stable_group(ctx.recipe, kind, starting_identity(ctx, kind))
    parts = f"{group}-{plan.warmup_steps}-{plan.tokens_per_step}"
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


@dataclass
class BranchTraining:
    """What both phases of a wsd kind train with: the same model, data, seed, masks, callbacks and loss."""

    spec: Any
    plan: BranchPlan
    tokenizer: Any
    make_model: Callable[[], Any]
    run: str
    seed: int
    masks: Any
    callbacks: list[TrainerCallback]
    train_loss: Any

    def stable(self, work_dir: Path, start: Path | None, keep: list[int], step: int) -> None:
        """Train the stable run in `work_dir` up to `step` (from `start` when that folder has none)."""
        curve = [
            MilestonesOnly(cb.windows, cb.has_bos, cb.every_tokens, cb.batch_size)
            for cb in self.callbacks
            if isinstance(cb, HeldOutCurveCallback)
        ]
        others = [cb for cb in self.callbacks if not isinstance(cb, HeldOutCurveCallback)]
        budget = step * self.plan.tokens_per_step
        train_model(
            self.make_model(),
            self.tokenizer,
            self.spec.model_copy(update={"token_budget": budget}),
            run=f"{self.run} (stable run)",
            seed=self.seed,
            work_dir=work_dir,
            masks=self.masks,
            callbacks=[ResumedPhase(), BranchPoints(keep), *curve, *others],
            train_loss=self.train_loss,
            schedule=self.plan.stable_args(step),
            resume_from=start,
        )
        gc.collect()  # the stable run's model and optimizer state, before the branch loads its own

    def branch(self, work_dir: Path, start: Path | None) -> tuple[Any, Any]:
        return train_model(
            self.make_model(),
            self.tokenizer,
            self.spec,
            run=self.run,
            seed=self.seed,
            work_dir=work_dir,
            masks=self.masks,
            callbacks=[ResumedPhase(), StepKillPoint("decay_step"), *self.callbacks],
            train_loss=self.train_loss,
            schedule=self.plan.branch_args(self.spec.token_budget),
            resume_from=start,
        )


def train_branch(
    ctx: Context, kind: str, spec: Any, tokenizer: Any, make_model: Callable[[], Any], **inputs: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Train `kind` on `spec.token_budget` as a decay branch of its stable run; `inputs` are
    `train_model`'s run, seed, masks, callbacks and train_loss. Returns the branch's Trainer, its
    `TrainOutcome` and what metrics.json records of the branch."""
    plan = BranchPlan.for_budgets(spec, [*ctx.providers.stable.budgets(ctx, kind), spec.token_budget])
    branch, key = plan.branch(spec.token_budget), stable_key(ctx, kind, plan)
    stable = StableRun(ctx.providers.stable.folder(ctx, key), plan)
    training = BranchTraining(spec, plan, tokenizer, make_model, **inputs)
    work_dir = training_work_dir(ctx.workspace.train_dir(kind), f"{ctx.fingerprint(f'train_{kind}')}-{key}")
    start = None
    if last_complete_checkpoint(work_dir / "checkpoints") is None:  # else: killed in the decay, resume there
        start = stable.extend_to(branch.branch_step, training.stable)
    trainer, outcome = training.branch(work_dir, start)
    stable.release(branch.branch_step)
    record = {
        "schedule": "wsd",
        "stable_run": key,
        "warmup_steps": plan.warmup_steps,
        **branch.to_dict(),
        "stable_budgets": [b.budget for b in plan.branches],
    }
    return trainer, outcome, record
