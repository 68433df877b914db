"""Full disks on a real small file system (a tmpfs in a private mount namespace: `conftest.run_on_small_fs`):
what the installed libraries raise when the disk is full becomes one line naming the folder and the fix;
the plan counts each stage's disk and refuses a run the output folder's file system cannot hold (exit 2,
before any work); a disk another process fills during training ends the run with one line (exit 1), and
once space is back the run resumes to the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import run_on_small_fs, tiny_config, tiny_recipe_yaml
from safetensors.torch import load_file

from hfprune._faults import FILL_ENV, FILL_FILE_ENV
from hfprune.cli import main
from hfprune.pipeline import runner as pipeline
from hfprune.plan import disk
from hfprune.plan.disk import checkpoints_kept, disk_needs, disk_problems
from hfprune.plan.estimate import estimate
from hfprune.recipe.schema import load_recipe


# The run of the report: the tiny parent, wanda 0.5, two runs, a checkpoint every step.
ISSUE_TRAIN = """\
train:
  runs: [continued, scratch]
  token_budget: 4096
  seq_len: 32
  args: {per_device_train_batch_size: 4, save_steps: 1}
"""
TRAIN = """\
train:
  runs: [continued]
  token_budget: 1024
  seq_len: 32
  args: {per_device_train_batch_size: 4, save_steps: 2, learning_rate: 1.0e-3}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
ENV.pop("HFPRUNE_DEBUG", None)


def write_recipe(folder: Path, parent: Path, output: Path, train: str, name: str = "tiny") -> Path:
    prune = "prune:\n  method: wanda\n  ratio: 0.5\n"
    path = folder / f"{name}.yaml"
    path.write_text(tiny_recipe_yaml(name, output, parent, prune=prune, max_windows=4) + train)
    return path


def hfprune(*args: str) -> list[str]:
    return [sys.executable, "-m", "hfprune", *args]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- what the installed libraries raise on a full disk ----------------------------------------------
CAPTURE = """
import json, os, sys
from pathlib import Path
full, out = Path(sys.argv[1]), Path(sys.argv[2])
os.environ["HF_HOME"] = str(full / "hf")
(full / "hf" / "hub").mkdir(parents=True)
with open(full / "neighbour", "wb") as f:  # another process took the space
    try:
        while True:
            f.write(bytes(65536)); f.flush()
    except OSError:
        pass
import torch
from datasets import load_dataset
from safetensors.torch import save_file
from hfprune.failures import write_failure
from huggingface_hub import constants

data = out / "data.jsonl"
data.write_text("".join(json.dumps({"text": "x" * 200}) + "\\n" for _ in range(3000)))
tensors = {"w": torch.zeros(100_000)}

def open_write(path):
    with open(path, "w") as f:
        f.write("x" * 100_000)

writes = {
    "safetensors": lambda: save_file(tensors, full / "out" / "model.safetensors"),
    "torch": lambda: torch.save(tensors, full / "out" / "optimizer.pt"),
    "open": lambda: open_write(full / "out" / "metrics.json"),
    "datasets cache": lambda: load_dataset("json", data_files=str(data), split="train"),
    "hub cache": lambda: open_write(Path(constants.HF_HUB_CACHE) / "blob"),
}
found = {}
full_hub = constants.HF_HUB_CACHE
for name, write in writes.items():
    (full / "out").mkdir(exist_ok=True)
    # Only the datasets cache full (the Hub's elsewhere), then only the Hub's (the datasets' unused).
    constants.HF_HUB_CACHE = str(out / "hub") if name == "datasets cache" else full_hub
    within = full / "out" if name in ("safetensors", "torch", "open") else out
    try:
        write()
        found[name] = None
    except Exception as err:
        mapped = write_failure(err, within, within)
        found[name] = [type(err).__name__, str(err), None if mapped is None else str(mapped)]
print("CAPTURED" + json.dumps(found))
"""


def test_what_the_installed_libraries_raise_on_a_full_disk_is_one_line_naming_the_folder(tmp_path):
    script = tmp_path / "capture.py"
    script.write_text(CAPTURE)
    (tmp_path / "out").mkdir()
    full = tmp_path / "full"
    done = run_on_small_fs(
        full, "1m", [sys.executable, str(script), str(full), str(tmp_path / "out")], env=ENV
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("CAPTURED", 1)[1])
    # The messages as the installed versions spell them (not hand-written ones).
    assert "os error 28" in found["safetensors"][1], found["safetensors"]
    assert "inline_container.cc" in found["torch"][1] or "No space left" in found["torch"][1]
    for name, (kind, raised, mapped) in found.items():
        assert mapped is not None, f"{name}: {kind}: {raised} not recognised"
        assert "no space left on device" in mapped and "rerun" in mapped and "\n" not in mapped, mapped
    for name in ("safetensors", "torch", "open"):
        assert str(full / "out") in found[name][2] and "output_dir" in found[name][2]
    assert (
        "(the datasets cache)" in found["datasets cache"][2]
        and "HF_DATASETS_CACHE" in found["datasets cache"][2]
    )
    assert "(the Hugging Face cache)" in found["hub cache"][2] and "HF_HOME" in found["hub cache"][2]


# -- the plan counts the disk -----------------------------------------------------------------------
def test_the_report_run_on_a_2mb_file_system_is_refused_before_any_work(tmp_path, tiny_parent_dir):
    mount = tmp_path / "small"
    path = write_recipe(tmp_path, tiny_parent_dir, mount / "tiny", ISSUE_TRAIN)
    left = tmp_path / "left"
    done = run_on_small_fs(mount, "2m", hfprune("run", str(path)), copy_to=left, env=ENV)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr[-3000:]
    report = done.stderr[done.stderr.index(errors[0]) :]
    problem = next(line for line in report.splitlines() if "stages still to run need" in line)
    for knob in ("train.args.save_total_limit", "save_steps", "output_dir", "free", "checkpoints"):
        assert knob in problem, problem
    assert list(left.iterdir()) == []  # nothing created: refused before any work

    dry = run_on_small_fs(mount, "2m", hfprune("run", str(path), "--dry-run"), env=ENV)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "DOES NOT FIT" in dry.stderr and "checkpoints:" in dry.stderr
    plan = json.loads(dry.stdout)["plan"]
    assert not plan["fits"] and plan["disk"][0]["need_bytes"] > plan["disk"][0]["free_bytes"]


Usage = namedtuple("Usage", "total used free")


def test_planned_disk_beyond_the_free_space_is_refused_with_the_memory_before_any_weights_load(
    tmp_path, tiny_parent_dir, monkeypatch
):
    path = write_recipe(tmp_path, tiny_parent_dir, tmp_path / "out" / "tiny", TRAIN)

    def no_weights(*_args, **_kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("transformers.PreTrainedModel.from_pretrained", no_weights)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda _path: Usage(2**30, 2**30 - 2**20, 2**20))
    result = CliRunner().invoke(main, ["run", str(path), "--host-memory", "512MiB"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "host memory" in result.stderr  # the memory and the disk, in one report
    assert "1.0 MiB free" in result.stderr and "save_total_limit" in result.stderr
    assert not (tmp_path / "out").exists()

    dry = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "disk" in dry.stderr.splitlines()[1] and "DOES NOT FIT" in dry.stderr


def test_each_stage_states_its_disk_and_the_check_counts_what_remains():
    train = load_recipe_like_train(save_total_limit=None)
    kept, why = checkpoints_kept(train, 4096)
    assert kept == 16 and "save_total_limit unset" in why  # 32 steps, a save every 2
    train = load_recipe_like_train(save_total_limit=3)
    assert checkpoints_kept(train, 4096)[0] == 4  # three kept and the one being written

    plan = estimate(tiny_config(), method="wanda", ratio=0.5, calibration=CAL, eval_sets=[], train=train)
    names = {s.name: [t.name for t in s.disk] for s in plan.stages}
    assert names["prune"][0] == "pruned model" and names["train_continued"][0] == "checkpoints"
    out = Path("/")
    everything = disk_needs([(None, plan, out, None)])[0]
    remaining = disk_needs([(None, plan, out, {"train_continued"})])[0]  # a resumed run
    assert remaining.stages == ["train_continued"] and remaining.need < everything.need
    sweep = disk_needs([("a", plan, out, None), ("b", plan, out, None)])[0]
    assert sweep.kept == 2 * everything.kept and sweep.peak == everything.peak  # cells one after another
    everything.free = everything.need - 1
    ((key, message),) = disk_problems([everything])
    assert key == "train.args.save_total_limit" and "save_steps" in message and "output_dir" in message


CAL = namedtuple("Cal", "num_samples seq_len batch_size")(4, 64, 1)


def load_recipe_like_train(save_total_limit: int | None):
    args = {"per_device_train_batch_size": 4, "save_steps": 2, "save_total_limit": save_total_limit}
    schedule = namedtuple("Schedule", "type")("cosine")
    return namedtuple("Train", "runs token_budget seq_len args schedule")(
        ["continued"], 4096, 32, args, schedule
    )


# -- a disk that fills during training --------------------------------------------------------------
def test_a_disk_filled_during_training_is_one_line_and_resumes_to_the_uninterrupted_result(
    tmp_path, tiny_parent_dir
):
    reference = load_recipe(write_recipe(tmp_path, tiny_parent_dir, tmp_path / "ref", TRAIN, "reference"))
    expected = pipeline.run(reference)

    mount, moved = tmp_path / "small", tmp_path / "larger"
    path = write_recipe(tmp_path, tiny_parent_dir, mount / "tiny", TRAIN)
    neighbour = {FILL_ENV: "checkpoint_complete:2", FILL_FILE_ENV: str(mount / "neighbour")}
    done = run_on_small_fs(mount, "64m", hfprune("run", str(path)), copy_to=moved, env={**ENV, **neighbour})
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = error_lines(done.stderr)
    assert "no space left on device" in line and str(mount / "tiny") in line and "rerun" in line, line
    assert "save_total_limit" in line and "output_dir" in line
    (moved / "neighbour").unlink()  # space is back: the same folder on a larger file system

    result = CliRunner().invoke(main, ["run", str(path), f"output_dir={moved / 'tiny'}"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "(ran: train_continued, continued_eval, card;" in result.output  # finished stages kept
    out = moved / "tiny"
    report = json.loads((out / "models/continued/training_report.json").read_text())
    assert report["resumed_from"] == "checkpoint-4"
    got, want = json.loads((out / "metrics.json").read_text()), expected.metrics
    assert got["continued"]["tokens_trained"] == want["continued"]["tokens_trained"] == 1024
    for kind in ("pruned", "continued"):
        mine = load_file(out / "models" / kind / "model.safetensors")
        theirs = load_file(reference.output_path / "models" / kind / "model.safetensors")
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), f"{kind}: {name}"
    assert not (out / ".hfprune/train/continued").exists()
    shutil.rmtree(moved)
