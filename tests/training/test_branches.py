"""Budget branches of the warmup-stable-decay schedule (`hfprune.training.schedules`, `hfprune.training.branches`).

A wsd kind trains as a decay branch of its model's stable run. Checked here on the tiny parent: a branch
spends its budget exactly, with the same tokens and learning rate at every step as a wsd run trained
straight to that budget; a `kill -9` in the stable phase or in a decay resumes to the uninterrupted
result; a finished branch is skipped on rerun; a sweep over budgets trains the stable run once and its
dry run prints the branch plan with the tokens saved.
"""

from __future__ import annotations

import contextlib
import json
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_recipe_yaml
from safetensors.torch import load_file
from test_fault_injection import comparable, run_killed
from transformers import AutoTokenizer, TrainerCallback
from transformers.optimization import get_wsd_schedule

from hfprune.cli import main
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.schema import load_recipe
from hfprune.recipe.training import ScheduleSpec
from hfprune.sweep.grid import load_sweep
from hfprune.sweep.runner import run_sweep
from hfprune.training import train as training
from hfprune.training.branches import StableRun
from hfprune.training.checkpoints import COMPLETE_MARKER
from hfprune.training.schedules import BranchPlan, schedule_args
from hfprune.training.sharding import load_for_training


STEP_TOKENS = 4 * 32
TRAIN = """\
train:
  runs: [continued]
  token_budget: 2048
  seq_len: 32
  schedule: {type: wsd}
  args: {per_device_train_batch_size: 4, save_steps: 2, logging_steps: 2, learning_rate: 1.0e-3}
"""


def write(folder: Path, name: str, parent: Path, train: str = TRAIN) -> Path:
    prune = "prune:\n  method: shortgpt\n  ratio: 0.5\n"
    text = tiny_recipe_yaml(name, folder / "out" / name, parent, prune=prune, max_windows=2)
    path = folder / f"{name}.yaml"
    path.write_text(text + train)
    return path


class StepLog(TrainerCallback):
    """Every optimizer step of every Trainer: (step, learning rate it uses, tokens counted so far)."""

    def __init__(self, steps: list[tuple[int, float, int]]) -> None:
        self.steps = steps

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append((state.global_step, optimizer.param_groups[0]["lr"], state.num_input_tokens_seen))


@contextlib.contextmanager
def recording(steps: list[tuple[int, float, int]]) -> Iterator[None]:
    real = training.PruneTrainer

    def logged(*args, callbacks=(), **kwargs):
        return real(*args, callbacks=[*callbacks, StepLog(steps)], **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "PruneTrainer", logged)
        yield


# -- the schedule ----------------------------------------------------------------------------------


def spec(**schedule) -> SimpleNamespace:
    return SimpleNamespace(
        schedule=ScheduleSpec(type="wsd", **schedule),
        warmup_ratio=0.05,
        min_lr_ratio=0.1,
        args={"per_device_train_batch_size": 4},
        seq_len=32,
        token_budget=2048,
    )


def rates(args: dict, steps: int) -> list[float]:
    """The learning rate (peak 1) of each optimizer step under `args`, as the Trainer builds it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_wsd_schedule(optimizer, args["warmup_steps"], **args["lr_scheduler_kwargs"])
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_each_branch_follows_the_stable_run_then_decays_to_the_floor(shape):
    plan = BranchPlan.for_budgets(spec(decay_shape=shape), [1024, 2048, 8192], STEP_TOKENS)
    assert [(b.steps, b.branch_step, b.decay_steps) for b in plan.branches] == [
        (8, 6, 2),
        (16, 13, 3),
        (64, 51, 13),
    ]
    assert plan.warmup_steps == 1  # ceil(0.05 x 1024 tokens / 128): the smallest budget's warmup
    assert plan.total_tokens == STEP_TOKENS * (51 + 2 + 3 + 13) < plan.from_start_tokens == STEP_TOKENS * 88
    stable = rates(plan.stable_args(51), 51)
    assert stable[0] == pytest.approx(0.1) and set(stable[1:]) == {1.0}
    for branch in plan.branches:
        used = rates(plan.branch_args(branch.budget), branch.steps)
        assert used[: branch.branch_step] == stable[: branch.branch_step]
        decay = used[branch.branch_step :]
        assert all(a > b for a, b in zip([1.0, *decay], decay, strict=False))  # below the peak, falling
        assert decay[-1] == pytest.approx(0.1)  # the step that spends the budget runs at the floor
    # Trained straight to a budget, wsd follows that budget's branch when the warmup is the same.
    alone = spec(warmup_tokens=100)
    assert schedule_args(alone, STEP_TOKENS) == BranchPlan.for_budgets(
        alone, [2048, 512], STEP_TOKENS
    ).branch_args(2048)


def test_a_stable_run_keeps_its_branch_points_and_replays_one_it_went_past(tmp_path):
    plan = BranchPlan.for_budgets(spec(), [1024, 2048], STEP_TOKENS)  # branch points 6 and 13
    run = StableRun(tmp_path / "stable", plan)
    calls = []

    def train(work_dir: Path, start: Path | None, keep: list[int], step: int) -> None:
        calls.append((work_dir.name, start and start.name, keep, step))
        for saved in (step - 1, step):
            folder = work_dir / "checkpoints" / f"checkpoint-{saved}"
            folder.mkdir(parents=True)
            (folder / COMPLETE_MARKER).write_text("")

    assert run.extend_to(13, train) == run.checkpoints / "checkpoint-13"
    assert run.extend_to(13, train) == run.checkpoints / "checkpoint-13"  # there already: no training
    assert calls == [("stable", None, [6, 13], 13)]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-13"]  # 12 was intermediate
    assert run.extend_to(6, train) == run.checkpoints / "checkpoint-6"  # gone past 6: replayed from 0
    assert calls[-1] == ("replay-6", None, [6, 13], 6) and not (tmp_path / "stable/replay-6").exists()
    run.release(13)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-13", "checkpoint-6"]
    run.release(6)
    assert not run.folder.exists()  # every branch trained: the stable run goes


# -- through the pipeline --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_parent_dir):
    """An uninterrupted wsd run (2048 tokens: stable run to step 13, decay 13 -> 16) and its steps."""
    recipe = load_recipe(write(tmp_path_factory.mktemp("wsd"), "reference", tiny_parent_dir))
    steps: list[tuple[int, float, int]] = []
    with recording(steps):
        pipeline.run(recipe)
    return recipe, steps


def test_a_branch_matches_a_straight_run_to_its_budget(reference, tmp_path):
    recipe, branched = reference
    spec, pruned = recipe.train_spec("continued"), recipe.output_path / "models/pruned"
    straight: list[tuple[int, float, int]] = []
    with recording(straight):
        trainer, outcome = training.train_model(
            load_for_training(pruned, spec.args),
            AutoTokenizer.from_pretrained(pruned),
            spec,
            run="straight",
            seed=recipe.seed,
            work_dir=tmp_path / "straight",
        )
    metrics = json.loads((recipe.output_path / "metrics.json").read_text())["continued"]
    assert metrics["tokens_trained"] == outcome.tokens_trained == 2048
    assert metrics["training"]["steps"] == outcome.steps == 16
    assert metrics["branch"]["branch_step"] == 13 and metrics["branch"]["decay_steps"] == 3
    assert metrics["training"]["resumed_from"] == "checkpoint-13"  # the branch started from the stable run
    assert branched == straight  # every step: same tokens, same learning rate (stable run, then decay)
    assert branched[13][1] < branched[12][1] == 1.0e-3
    mine = load_file(recipe.output_path / "models/continued/model.safetensors")
    theirs = trainer.model.state_dict()
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=1e-6)
    assert not list((recipe.output_path / ".hfprune").rglob("checkpoint-*"))  # stable run released


def test_a_finished_branch_is_skipped_on_rerun(reference):
    recipe, _ = reference
    steps: list[tuple[int, float, int]] = []
    with recording(steps):
        summary = pipeline.run(recipe)
    assert not [o.stage for o in summary.outcomes if o.ran] and steps == []


@pytest.mark.parametrize(
    ("point", "resumed"), [("stable_step:5", "checkpoint-13"), ("decay_step:2", "checkpoint-14")]
)
def test_a_kill_in_the_stable_phase_or_a_decay_resumes_token_exact(
    point, resumed, tmp_path, tiny_parent_dir, reference
):
    path = write(tmp_path, "killed", tiny_parent_dir)
    killed = run_killed(path, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    out = load_recipe(path).output_path
    stable = [p.name for p in (out / ".hfprune/stable").rglob("checkpoint-*")]
    decay = [p.name for p in (out / ".hfprune/train/continued").rglob("checkpoint-*")]
    # Killed after step 5 (the stable run saved step 4) or after step 15 (the branch saved step 14).
    assert (stable, decay) == (
        (["checkpoint-4"], []) if point.startswith("stable") else (["checkpoint-13"], ["checkpoint-14"])
    )
    recipe = load_recipe(path)
    pipeline.run(recipe)
    got, expected = (json.loads((p / "metrics.json").read_text()) for p in (out, reference[0].output_path))
    assert (
        got["continued"]["tokens_trained"] == 2048 and got["continued"]["training"]["resumed_from"] == resumed
    )
    assert comparable(got) == comparable(expected)
    mine, theirs = (
        load_file(p / "models/continued/model.safetensors") for p in (out, reference[0].output_path)
    )
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)
    assert not list((out / ".hfprune").rglob("checkpoint-*"))


def test_both_settings_of_a_twin_branch_from_one_stable_run(tmp_path, tiny_parent_dir):
    train = TRAIN.replace("[continued]", "[scratch, scratch_pipeline]").replace("2048", "1024")
    path = write(tmp_path, "twins", tiny_parent_dir, train)
    path.write_text(path.read_text().replace("parent:\n", "parent:\n  pretrained_tokens: 1024\n"))
    recipe = load_recipe(path)
    steps: list[tuple[int, float, int]] = []
    with recording(steps):
        metrics = pipeline.run(recipe).metrics
    scratch, pipeline_budget = metrics["scratch"], metrics["scratch_pipeline"]
    assert (scratch["tokens_trained"], pipeline_budget["tokens_trained"]) == (1024, 2048)
    assert (scratch["setting"], pipeline_budget["setting"]) == (1, 2)
    assert scratch["branch"]["stable_run"] == pipeline_budget["branch"]["stable_run"]
    assert len(steps) == 13 + 2 + 3 < 8 + 16  # one stable run to step 13, then both decays
    assert not list((recipe.output_path / ".hfprune").rglob("checkpoint-*"))


# -- a sweep ---------------------------------------------------------------------------------------


def write_sweep(folder: Path, parent: Path, runs: str, sweep: str, extra: str = "") -> Path:
    text = tiny_recipe_yaml("grid", folder / "out" / "grid", parent, max_windows=2) + extra
    train = TRAIN.replace("  runs: [continued]\n", f"  runs: {runs}\n").replace("  token_budget: 2048\n", "")
    path = folder / "grid.yaml"
    path.write_text(text + train + "sweep:\n" + textwrap.indent(textwrap.dedent(sweep), "  "))
    return path


def test_a_wsd_sweep_trains_the_stable_run_once(tmp_path, tiny_parent_dir):
    # Largest budget first: the stable run keeps the smaller budget's branch point on its way.
    path = write_sweep(
        tmp_path,
        tiny_parent_dir,
        "[continued]",
        "method: [shortgpt]\nratio: [0.5]\ntoken_budget: [2048, 1024]\n",
    )
    dry = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    [group] = plan["branch_plans"]
    assert group["kinds"] == ["continued"] and group["models"] == ["shortgpt-r0.5"]
    assert [(b["budget"], b["branch_step"], b["decay_steps"]) for b in group["branches"]] == [
        (1024, 6, 2),
        (2048, 13, 3),
    ]
    assert (group["total_tokens"], group["from_start_tokens"], group["saved_tokens"]) == (2304, 3072, 768)
    assert "2304 training tokens instead of 3072 from the start (768 saved, 25%)" in dry.stderr
    rows = {row["cell"]: row for row in plan["cells"]}
    assert rows["shortgpt-r0.5-t1024"]["trained"] == [
        {"kind": "continued", "token_budget": 1024, "setting": 1}
    ]
    sweep = load_sweep(path)
    assert {cell.recipe.train.schedule.warmup_tokens for cell in sweep.cells} == {52}  # 5% of 1024, pinned

    steps: list[tuple[int, float, int]] = []
    with recording(steps):
        run_sweep(sweep)
    assert len(steps) * STEP_TOKENS == 2304 < 1024 + 2048  # stable run 13 steps, decays 3 and 2
    for cell in sweep.cells:
        metrics = json.loads((cell.recipe.output_path / "metrics.json").read_text())["continued"]
        assert metrics["tokens_trained"] == cell.token_budget
    assert not list(sweep.output_path.rglob("checkpoint-*"))


def test_the_dry_run_shares_one_stable_run_between_both_settings_of_a_twin(tmp_path, tiny_parent_dir):
    path = write_sweep(
        tmp_path,
        tiny_parent_dir,
        "[continued, scratch, scratch_pipeline]",
        "method: [shortgpt, minitron_depth]\nratio: [0.5]\ntoken_budget: [1024, 2048]\n",
    )
    text = path.read_text().replace(
        f"  model: {tiny_parent_dir}\n", f"  model: {tiny_parent_dir}\n  pretrained_tokens: 4096\n"
    )
    path.write_text(text)
    dry = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    groups = {(tuple(g["kinds"]), tuple(g["models"])): g for g in plan["branch_plans"]}
    both = ("shortgpt-r0.5", "minitron_depth-r0.5")
    assert set(groups) == {
        (("continued",), ("shortgpt-r0.5",)),
        (("continued",), ("minitron_depth-r0.5",)),
        (("scratch", "scratch_pipeline"), both),  # one twin shape: one stable run, settings 1 and 2
    }
    twin = groups[("scratch", "scratch_pipeline"), both]
    assert [b["budget"] for b in twin["branches"]] == [1024, 2048, 5120, 6144]
    assert twin["total_tokens"] < twin["from_start_tokens"]
    row = next(r for r in plan["cells"] if r["cell"] == "shortgpt-r0.5-t1024")
    assert {"kind": "scratch_pipeline", "token_budget": 5120, "setting": 2} in row["trained"]
    assert "scratch_pipeline 5120 (2)" in dry.stderr
