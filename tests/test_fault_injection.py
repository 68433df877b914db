"""Fault injection: `hfprune run` on the tiny parent is SIGKILLed at a named point (`hfprune._faults`),
rerun to completion, and must end exactly where an uninterrupted run ends: the same tokens trained, the
same weights in every `models/<kind>/model.safetensors` (torch.equal), the same metrics bar wall-clock
seconds, and nothing left behind (no temporaries, no lock, no training checkpoints).

The fast suite kills at a few points that cover the three kinds of damage (a finished stage not yet
recorded, a checkpoint written but not marked complete, a trained model staged but not published) and
inside a push to the local Hub server; `test_every_kill_point` (slow) tries every stage boundary and
every save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_recipe_yaml
from safetensors.torch import load_file

from hfprune._faults import ENV
from hfprune.outputs import _TEMPORARY, LOCK_FILE
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.schema import load_recipe


pytest_plugins = ["hub_fixtures"]  # the fake_hub fixture

TRAIN = """\
train:
  runs: [continued]
  token_budget: 1024
  seq_len: 32
  args: {per_device_train_batch_size: 4, save_steps: 2, logging_steps: 2, learning_rate: 1.0e-3}
"""
PUSH = "push: {enabled: true, repo_prefix: tester/fault-run}\n"
FAST_POINTS = ["after:prune", "checkpoint_save:2", "final_save"]
# Every stage boundary of the recipe, the pruned model's atomic save, every checkpoint (steps 2, 4, 6,
# 8) and the staged trained model.
STAGES = ["parent_eval", "prune", "pruned_eval", "train_continued", "continued_eval", "card"]
ALL_POINTS = [f"{when}:{stage}" for stage in STAGES for when in ("before", "unrecorded", "after")] + [
    "atomic_save",  # the one folder a single run saves through atomic_dir: the pruned model
    *(f"checkpoint_save:{n}" for n in (1, 2, 3, 4)),
    "final_save",
]


def write(folder: Path, name: str, parent: Path, extra: str = "") -> Path:
    prune = "prune:\n  method: shortgpt\n  ratio: 0.5\n"
    text = tiny_recipe_yaml(name, folder / "out" / name, parent, prune=prune, max_windows=2)
    path = folder / f"{name}.yaml"
    path.write_text(text + TRAIN + extra)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_parent_dir) -> Path:
    """The output folder of an uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(write(folder, "reference", tiny_parent_dir))
    pipeline.run(recipe)
    return recipe.output_path


def run_killed(path: Path, point: str, **env: str) -> subprocess.CompletedProcess:
    """`hfprune run` in a subprocess that SIGKILLs itself at `point`."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", ENV: point, **env}
    return subprocess.run(
        [sys.executable, "-m", "hfprune", "run", str(path)], env=environ, capture_output=True
    )


# What differs between a resumed and an uninterrupted run by design: how long it took, where it resumed
# from, and the push records (commit ids).
INCIDENTAL = ("resumed_from", "hub")


def comparable(metrics: Any) -> Any:
    """Metrics without wall-clock seconds and the other `INCIDENTAL` records."""
    if isinstance(metrics, dict):
        return {k: comparable(v) for k, v in metrics.items() if "seconds" not in k and k not in INCIDENTAL}
    if isinstance(metrics, list):
        return [comparable(v) for v in metrics]
    return metrics


def assert_same_result(out: Path, reference: Path) -> None:
    got, expected = (json.loads((p / "metrics.json").read_text()) for p in (out, reference))
    assert got["continued"]["tokens_trained"] == expected["continued"]["tokens_trained"] == 1024
    assert comparable(got) == comparable(expected)
    kinds = sorted(p.parent.name for p in (reference / "models").glob("*/model.safetensors"))
    assert kinds == sorted(p.parent.name for p in (out / "models").glob("*/model.safetensors"))
    for kind in kinds:
        mine, theirs = (load_file(p / "models" / kind / "model.safetensors") for p in (out, reference))
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), f"{kind}: {name}"
    leftovers = [p for p in out.rglob("*") if _TEMPORARY.match(p.name)]
    assert not leftovers and not (out / LOCK_FILE).exists()
    assert not list((out / ".hfprune").rglob("checkpoint-*"))  # training checkpoints go on publication


def kill_and_resume(path: Path, point: str, reference: Path, **env: str) -> None:
    killed = run_killed(path, point, **env)
    assert killed.returncode == -signal.SIGKILL, f"{point} never reached: {killed.stderr.decode()[-3000:]}"
    recipe = load_recipe(path)
    pipeline.run(recipe)
    assert_same_result(recipe.output_path, reference)
    if point.startswith("checkpoint_save"):  # resumed from the checkpoint before the one cut short
        step = 2 * (int(point.split(":")[1]) - 1)
        resumed = json.loads((recipe.output_path / "metrics.json").read_text())["continued"]["training"]
        assert resumed.get("resumed_from") == (f"checkpoint-{step}" if step else None)


@pytest.mark.parametrize("point", FAST_POINTS)
def test_a_kill_resumes_to_the_uninterrupted_result(point, tmp_path, tiny_parent_dir, reference):
    kill_and_resume(write(tmp_path, "killed", tiny_parent_dir), point, reference)


def test_a_kill_inside_a_push_resumes_and_publishes_the_same_files(
    tmp_path, tiny_parent_dir, reference, fake_hub
):
    from hub_fixtures import TEST_TOKEN

    path = write(tmp_path, "pushed", tiny_parent_dir, PUSH)
    hub_env = {"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TEST_TOKEN, "HF_HUB_OFFLINE": "0"}
    hub_env["HF_HOME"] = str(tmp_path / "hf-home")
    killed = run_killed(path, "push", **hub_env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    repo = "tester/fault-run"
    assert "model.safetensors" in fake_hub.repo_files(repo)  # the commit landed before the kill
    recipe = load_recipe(path)
    summary = pipeline.run(recipe)
    assert [o.stage for o in summary.outcomes if o.ran] == ["push"]
    out = recipe.output_path
    assert summary.metrics["continued"]["hub"]["repo_id"] == repo
    published = fake_hub.repo_files(repo)
    for file in (out / "models/continued").iterdir():
        assert published[file.name] == file.read_bytes(), file.name
    assert_same_result(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ALL_POINTS)
def test_every_kill_point(point, tmp_path, tiny_parent_dir, reference):
    kill_and_resume(write(tmp_path, "killed", tiny_parent_dir), point, reference)
