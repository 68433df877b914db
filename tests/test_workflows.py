"""The GitHub Actions workflows (`.github/workflows/recipe.yml`, `sweep.yml`), read as a runner reads them.

Their YAML is parsed and their shell steps run here with the environment a runner would give them
(GITHUB_ENV, GITHUB_PATH, GITHUB_OUTPUT applied between steps): where the token is visible, where outputs
live, how torchrun is launched, and a sweep on the tiny parent carried through its jobs (the parent
evaluated once, a shared twin trained once, one report). `tests/test_hub.py` runs actionlint on them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe_yaml


ROOT = Path(__file__).parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
VENV_BIN = Path(sys.executable).parent

# The steps that read the parent from the Hub or push, by workflow, job and step id: the only ones
# that may see the token.
TOKEN_STEPS = {
    "recipe.yml": {("run", "run")},
    "sweep.yml": {("plan", "grid"), ("plan", "parent-eval"), ("cells", "sweep")},
}


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def step_label(step: dict) -> str:
    return step.get("id") or step.get("name") or step.get("uses", "?")


def secret_uses(node: object, where: tuple = ()) -> list[tuple]:
    """Every place under `node` whose text reads a secret, as its key path."""
    if isinstance(node, dict):
        return [hit for key, value in node.items() for hit in secret_uses(value, (*where, key))]
    if isinstance(node, list):
        return [
            hit
            for index, item in enumerate(node)
            for hit in secret_uses(item, (*where, step_label(item) if isinstance(item, dict) else str(index)))
        ]
    return [where] if isinstance(node, str) and "secrets." in node else []


@pytest.mark.parametrize("name", sorted(TOKEN_STEPS))
def test_hf_token_reaches_only_the_steps_that_read_the_hub_or_push(name):
    workflow = load(name)
    uses = secret_uses(workflow)
    # Only a step's own env, never the workflow's or a job's env (which every step would inherit).
    assert all(path[0] == "jobs" and path[2] == "steps" and path[4] == "env" for path in uses), uses
    assert {(path[1], path[3]) for path in uses} == TOKEN_STEPS[name]
    assert {path[5] for path in uses} == {"HF_TOKEN"}
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "")
            if "pip install" in script or "hfprune assets" in script or "tar " in script:
                assert "HF_TOKEN" not in step.get("env", {}), step_label(step)


@pytest.mark.parametrize("name", sorted(TOKEN_STEPS))
def test_scripts_take_inputs_from_the_environment(name):
    """An input pasted into a script's text by `${{ }}` could inject shell; they arrive through env."""
    for job in load(name)["jobs"].values():
        for step in job["steps"]:
            assert "${{" not in step.get("run", ""), step_label(step)


class Runner:
    """One job on one runner: runs a workflow's shell steps as the runner does, in a scratch workspace."""

    def __init__(self, root: Path, workflow: str, job: str, **env: str):
        self.workflow, self.job = load(workflow), job
        self.workspace = root / "work" / "repo" / "repo"
        self.temp = root / "temp"
        for folder in (self.workspace, self.temp):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HOME", "HF_TOKEN"))}
        self.env.update(GITHUB_WORKSPACE=str(self.workspace), RUNNER_TEMP=str(self.temp), **env)
        self.env["PATH"] = f"{VENV_BIN}{os.pathsep}{self.env['PATH']}"

    def step(self, ident: str, check: bool = True, **env: str) -> dict[str, str]:
        """Run step `ident` with `env` standing for its `${{ }}` values; returns its outputs."""
        job = self.workflow["jobs"][self.job]
        step = next(s for s in job["steps"] if step_label(s) == ident)
        # Expressions of the workflow's and the job's env that the test does not give read as empty
        # (an empty input); a step's own must be given.
        inherited = {**self.workflow.get("env", {}), **job.get("env", {})}
        literal = {k: "" if "${{" in str(v) else str(v) for k, v in inherited.items() if k not in self.env}
        literal.update((k, str(v)) for k, v in step.get("env", {}).items() if "${{" not in str(v))
        missing = set(step.get("env", {})) - set(literal) - set(env)
        assert not missing, f"the test gives no value for {missing}"
        files = {name: self.temp / f"{ident}.{name}" for name in ("env", "path", "output", "summary")}
        for path in files.values():
            path.write_text("")
        script = self.temp / f"{ident}.sh"
        script.write_text(step["run"])
        run_env = {**self.env, **literal, **env}
        run_env.update({f"GITHUB_{k.upper()}": str(v) for k, v in files.items()})
        run_env["GITHUB_STEP_SUMMARY"] = run_env.pop("GITHUB_SUMMARY")
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=self.workspace,
            env=run_env,
            capture_output=True,
            text=True,
        )
        self.last = done
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        self.env.update(line.split("=", 1) for line in files["env"].read_text().splitlines())
        for folder in files["path"].read_text().splitlines():
            self.env["PATH"] = f"{folder}{os.pathsep}{self.env['PATH']}"
        self.summary = files["summary"].read_text()
        return dict(line.split("=", 1) for line in files["output"].read_text().splitlines())


ONLY_DEPTH = "method=shortgpt,ratio=0.5 method=minitron_depth,ratio=0.5"
WHERE = {"PY_VERSION": "3.11.9", "DEPS_HASH": "abc", "RECIPE": "recipes/depth_0.5.yaml", "OVERRIDES": ""}


@pytest.mark.parametrize(
    ("name", "job", "folder"), [("recipe.yml", "run", "OUTPUT_DIR"), ("sweep.yml", "cells", "SWEEP_DIR")]
)
def test_outputs_venv_and_caches_live_outside_the_checkout(tmp_path, name, job, folder):
    """actions/checkout cleans the workspace at every job: what must survive for a resume is beside it."""
    runner = Runner(tmp_path / "runner", name, job, CI_HOME_SETTING="")
    assert runner.step("where", **WHERE) == {"venv_ready": "false"}
    for key in (folder, "VENV", "HF_HOME", "PIP_CACHE_DIR"):
        path = Path(runner.env[key])
        assert path.is_absolute() and not path.is_relative_to(runner.workspace), key
        assert path.is_relative_to(runner.workspace.parent / "hfprune-ci"), key
    assert Path(runner.env[folder]).name == "depth_0.5"
    Path(runner.env["VENV"]).mkdir(parents=True)
    (Path(runner.env["VENV"]) / ".complete").touch()
    assert runner.step("where", **WHERE) == {"venv_ready": "true"}  # a built venv is reused
    assert runner.step("where", **{**WHERE, "DEPS_HASH": "new"}) == {"venv_ready": "false"}
    shared = Runner(tmp_path / "other", name, job, CI_HOME_SETTING=str(tmp_path / "nfs"))
    shared.step("where", **WHERE)
    assert Path(shared.env[folder]).is_relative_to(tmp_path / "nfs")


def test_parent_is_named_for_its_hub_cache(tmp_path, write_recipe):
    """A Hub parent's cache folder and key; not downloaded again when the runner's disk holds it.
    (A local parent, nothing to cache, is in the sweep test below.)"""
    recipe = str(write_recipe())
    runner = Runner(tmp_path / "runner", "recipe.yml", "run", CI_HOME_SETTING="")
    runner.step("where", **{**WHERE, "RECIPE": recipe})
    hub_parent = {"RECIPE": recipe, "OVERRIDES": "parent.model=meta-llama/Llama-3.1-8B"}
    folder = Path(runner.env["HF_HOME"]) / "hub" / "models--meta-llama--Llama-3.1-8B"
    assert runner.step("parent", **hub_parent) == {
        "folder": str(folder),
        "key": "hub-meta-llama_Llama-3.1-8B_main",
        "warm": "false",
    }
    (folder / "snapshots").mkdir(parents=True)
    assert runner.step("parent", **hub_parent)["warm"] == "true"


@pytest.fixture
def fake_launchers(tmp_path):
    """`hfprune` and `torchrun` that print their command line."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name in ("hfprune", "torchrun"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho {name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    ("name", "job", "ident", "env", "command"),
    [
        ("recipe.yml", "run", "run", {}, "run r.yaml a=1 b=2 output_dir=/out"),
        (
            "sweep.yml",
            "cells",
            "sweep",
            {"ONLY": ONLY_DEPTH, "GROUP": "g", "CELLS": "c"},
            f"sweep r.yaml --only {ONLY_DEPTH.replace(' ', ' --only ')} a=1 b=2 output_dir=/out",
        ),
    ],
)
def test_torchrun_runs_multi_gpu_recipes(tmp_path, fake_launchers, name, job, ident, env, command):
    runner = Runner(tmp_path, name, job, RECIPE="r.yaml", OVERRIDES="a=1 b=2", CI_HOME_SETTING="")
    runner.env["PATH"] = f"{fake_launchers}{os.pathsep}{runner.env['PATH']}"
    env = {**env, "HF_TOKEN": "", "OUTPUT_DIR": "/out", "SWEEP_DIR": "/out"}
    runner.step(ident, NPROC="1", **env)
    assert runner.last.stdout.strip() == f"hfprune {command}"
    runner.step(ident, NPROC="8", **env)
    assert runner.last.stdout.strip() == f"torchrun --standalone --nproc_per_node=8 -m hfprune {command}"
    runner.step(ident, check=False, NPROC="0", **env)
    assert runner.last.returncode == 2 and "nproc must be a positive whole number" in runner.last.stdout


SWEEP = """
train:
  seq_len: 32
  args: {per_device_train_batch_size: 4, save_steps: 100, learning_rate: 1.0e-3}
sweep:
  method: [shortgpt, minitron_depth, wanda]
  ratio: [0.5]
  token_budget: [256]
"""
DEPTH = "shortgpt+minitron_depth-r0.5"
DEPTH_CELLS = ["shortgpt-r0.5-t256", "minitron_depth-r0.5-t256"]
MARKER = 12345.0


def plan_job(tmp_path: Path, inputs: dict[str, str]) -> tuple[Runner, dict[str, str]]:
    """The plan job: the grid's groups, and the parent evaluated once (its score replaced by a marker
    that only a cell copying it, rather than evaluating the parent again, can show)."""
    plan = Runner(tmp_path / "gpu-1", "sweep.yml", "plan", **inputs)
    plan.step("where", **WHERE)
    assert plan.step("parent")["folder"] == ""  # a local parent: no Hub cache
    grid = plan.step("grid", HF_TOKEN="")
    assert json.loads(grid["groups"]) == [
        {"name": DEPTH, "only": ONLY_DEPTH, "cells": " ".join(DEPTH_CELLS)},
        {"name": "wanda-r0.5", "only": "method=wanda,ratio=0.5", "cells": "wanda-r0.5-t256"},
    ]
    assert grid["parent_cell"] == DEPTH_CELLS[0]
    plan.step("parent-eval", HF_TOKEN="", PARENT_CELL=grid["parent_cell"])
    evaluated = Path(plan.env["PARENT_DIR"]) / grid["parent_cell"]
    assert json.loads((evaluated / ".hfprune" / "stages.json").read_text()).keys() == {"parent_eval"}
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics.keys() == {"parent"}
    metrics["parent"]["perplexity"]["pydoc"]["value"] = MARKER
    (evaluated / "metrics.json").write_text(json.dumps(metrics))
    plan.step("pack-parent", PARENT_CELL=grid["parent_cell"])
    return plan, grid


def group_job(tmp_path: Path, inputs: dict[str, str], plan: Runner, group: dict[str, str]) -> Runner:
    """The matrix job of the depth group on another runner: the parent's evaluation taken, its cells run."""
    matrix = {"GROUP": group["name"], "ONLY": group["only"], "CELLS": group["cells"]}
    cells = Runner(tmp_path / "gpu-2", "sweep.yml", "cells", **inputs, **matrix)
    cells.step("where", **WHERE)
    (cells.temp / "parent-eval").mkdir()  # what actions/download-artifact leaves
    shutil.copy(plan.temp / "pack" / "parent-eval.tar", cells.temp / "parent-eval")
    cells.step("take-parent")
    cells.step("sweep", HF_TOKEN="", NPROC="1")
    sweep_dir = Path(cells.env["SWEEP_DIR"])
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted([*DEPTH_CELLS, "report.json", "report.md"])
    metrics = {cell: json.loads((sweep_dir / cell / "metrics.json").read_text()) for cell in DEPTH_CELLS}
    parent_scores = {cell: m["parent"]["perplexity"]["pydoc"]["value"] for cell, m in metrics.items()}
    assert parent_scores == dict.fromkeys(DEPTH_CELLS, MARKER)  # copied, not evaluated again
    assert metrics[DEPTH_CELLS[1]]["scratch"]["shared_from"] == DEPTH_CELLS[0]  # one twin trained
    assert "shared_from" not in metrics[DEPTH_CELLS[0]]["scratch"]
    # A rerun of the job takes the parent's evaluation again, but never over a cell it already holds.
    cells.step("take-parent")
    ledger = sweep_dir / DEPTH_CELLS[0] / ".hfprune" / "stages.json"
    assert "train_scratch" in json.loads(ledger.read_text())
    return cells


@pytest.mark.slow  # five hfprune processes end to end: about 2 minutes on 2 cores
def test_sweep_jobs_evaluate_the_parent_once_and_train_a_shared_twin_once(tmp_path, tiny_parent_dir):
    recipe = tmp_path / "grid.yaml"
    base = tiny_recipe_yaml("grid", tmp_path / "x", tiny_parent_dir, max_windows=4)
    recipe.write_text(base + textwrap.dedent(SWEEP))
    inputs = {"RECIPE": str(recipe), "OVERRIDES": "seed=0", "CI_HOME_SETTING": ""}
    plan, grid = plan_job(tmp_path, inputs)
    cells = group_job(tmp_path, inputs, plan, json.loads(grid["groups"])[0])
    checkpoints = Path(cells.env["SWEEP_DIR"]) / DEPTH_CELLS[0] / ".hfprune" / "train" / "continued"
    checkpoints.mkdir(parents=True)
    (checkpoints / "optimizer.pt").write_text("a killed run's checkpoint")
    cells.step("pack")
    with tarfile.open(cells.temp / "pack" / f"report-{DEPTH}.tar") as tar:
        read = ("metrics.json", "recipe.yaml", "models/pruned/prune_report.json")
        assert set(tar.getnames()) == {f"{cell}/{name}" for cell in DEPTH_CELLS for name in read}
    with tarfile.open(cells.temp / "pack" / f"models-{DEPTH}.tar") as tar:
        names = set(tar.getnames())
        assert tar.getmember(f"{DEPTH_CELLS[1]}/models/scratch/model.safetensors").islnk()  # one copy
    kinds = ("pruned", "continued", "scratch")
    assert {f"{c}/models/{kind}/model.safetensors" for c in DEPTH_CELLS for kind in kinds} <= names
    assert f"{DEPTH_CELLS[0]}/.hfprune/stages.json" in names  # the ledger: a run resumes from the artifact
    assert not any("/.hfprune/train" in name for name in names)

    report_dir = tmp_path / "hosted" / "runs" / "sweep"
    report = Runner(tmp_path / "hosted", "sweep.yml", "report", **inputs, REPORT_DIR=str(report_dir))
    (report.temp / "reports").mkdir()
    shutil.copy(cells.temp / "pack" / f"report-{DEPTH}.tar", report.temp / "reports")
    report.step("gather")
    report.step("report")
    text = (report_dir / "report.md").read_text()
    assert "| shortgpt | 0.5 " in text and "| minitron_depth | 0.5 " in text
    assert f"Parent: {MARKER:.2f}" in text
    assert f"(twin of {DEPTH_CELLS[0]})" in text and report.summary == text  # also the job's summary
