"""Run-time reliability: resuming after a kill past the last checkpoint, full disks, out of memory, one
writer per output folder, stale temporaries, and run-time failures that must be one line, not a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from hfprune.cli import main
from hfprune.failures import OutOfMemory, OutputError, translate_oom, write_failure
from hfprune.outputs import (
    LOCK_FILE,
    OutputInUse,
    atomic_dir,
    distributed_staging_dir,
    output_lock,
    read_json,
    remove_stale_temporaries,
    write_json,
)
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.schema import load_recipe


TRAIN = """
train:
  runs: [continued]
  token_budget: 2000
  seq_len: 32
  args: {per_device_train_batch_size: 4, save_steps: 4, logging_steps: 4, learning_rate: 1.0e-3}
"""
FULL_DISK = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)
TORCH_WRITE = "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("HFPRUNE_DEBUG", raising=False)


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_line_failure(result, *fragments: str) -> str:
    """Exit 1, one `error:` line naming every fragment, and no traceback anywhere."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# -- finding 1: a kill between the final checkpoint and the published model -------------------------
KILL_IN_FINAL_SAVE = """
import os, signal, sys
from hfprune.trainer import PruneTrainer

original = PruneTrainer.save_model

def save_then_die(self, output_dir=None, _internal_call=False):
    original(self, output_dir, _internal_call)
    if not _internal_call:  # the trained model's save, not a checkpoint's
        os.kill(os.getpid(), signal.SIGKILL)

PruneTrainer.save_model = save_then_die
from hfprune.cli import main
main(["run", *sys.argv[1:]])
"""


class Records(logging.Handler):
    """Collects the messages of a logger that does not propagate to caplog (transformers' own)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_kill_after_the_final_checkpoint_resumes_to_the_uninterrupted_result(write_recipe, tmp_path, caplog):
    overrides = ["eval.every_tokens=768"]
    reference = load_recipe(write_recipe(TRAIN, name="reference"), overrides)
    expected = pipeline.run(reference).metrics["continued"]

    path = write_recipe(TRAIN)
    script = tmp_path / "kill_in_final_save.py"
    script.write_text(KILL_IN_FINAL_SAVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    killed = subprocess.run([sys.executable, script, str(path), *overrides], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    recipe = load_recipe(path, overrides)
    out = recipe.output_path
    assert (out / "models/.continued.staging").is_dir() and not (out / "models/continued").exists()
    assert (out / ".hfprune/train/continued/checkpoints/checkpoint-16").is_dir()  # the final step's

    trainer_log = Records()
    logging.getLogger("transformers.trainer").addHandler(trainer_log)
    try:
        summary = pipeline.run(recipe)
    finally:
        logging.getLogger("transformers.trainer").removeHandler(trainer_log)
    assert [o.stage for o in summary.outcomes if o.ran][:2] == ["train_continued", "continued_eval"]
    # Ending at once is the expected end of a finished run, not a shortage of data or an epoch without data.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "budget" in r.getMessage()]
    assert not [m for m in trainer_log.messages if "not to be a single sample" in m]
    got = summary.metrics["continued"]
    assert got["tokens_trained"] == expected["tokens_trained"] == 2048
    assert got["curve"] == expected["curve"]  # the end-of-training point measured on the same weights
    assert got["perplexity"] == expected["perplexity"]
    report = json.loads((out / "models/continued/training_report.json").read_text())
    assert report["resumed_from"] == "checkpoint-16" and report["steps"] == 16
    resumed = AutoModelForCausalLM.from_pretrained(out / "models/continued")
    straight = AutoModelForCausalLM.from_pretrained(reference.output_path / "models/continued")
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not (out / ".hfprune/train/continued").exists()  # checkpoints go once the model is published


# -- finding 2: a full disk is one line -------------------------------------------------------------
@pytest.mark.parametrize(
    ("raised", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
        (OSError(errno.EACCES, "Permission denied"), "permission denied"),
        (SafetensorError(FULL_DISK), "no space left on device"),
        (SafetensorError(FULL_DISK.replace("code: 28", "code: 122")), "disk quota exceeded"),
    ],
)
def test_write_failures_become_one_line_output_errors(tmp_path, raised, reason):
    target = tmp_path / "models" / "pruned"
    mapped = write_failure(raised, target, target.parent)
    assert isinstance(mapped, OutputError) and mapped.exit_code == 1
    assert str(target) in str(mapped) and reason in str(mapped) and "rerun" in str(mapped)
    assert "\n" not in str(mapped)


def test_torch_serializer_failure_says_disk_full_when_it_is(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints"
    assert "no space left" not in str(write_failure(RuntimeError(TORCH_WRITE), target))
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(10, 10, 0))
    assert "no space left on device" in str(write_failure(RuntimeError(TORCH_WRITE), target))


def test_unrelated_errors_pass_through(tmp_path):
    target = tmp_path / "models" / "pruned"
    assert write_failure(RuntimeError("shape mismatch"), target) is None
    assert write_failure(SafetensorError("tensors share memory"), target) is None
    elsewhere = PermissionError(errno.EACCES, "Permission denied", "/etc/shadow")
    assert write_failure(elsewhere, target, target.parent) is None  # a read elsewhere, not our write
    assert write_failure(OSError(errno.EMFILE, "Too many open files"), target) is None
    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/x")
    assert isinstance(write_failure(full, target, target.parent), OutputError)  # only a write fills a disk


def test_full_disk_saving_the_pruned_model_is_one_line_and_leaves_nothing(write_recipe, monkeypatch):
    path = write_recipe()

    def full_disk(*_args, **_kwargs):
        raise SafetensorError(FULL_DISK)

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full_disk)
    result = cli("prune", str(path))
    out = load_recipe(path).output_path
    line = assert_one_line_failure(result, str(out / "models/pruned"), "no space left on device", "rerun")
    assert line.startswith("error: could not write ")  # the message, without an `[Errno 28]` prefix
    assert [p.name for p in (out / "models").iterdir()] == []  # no temporary left behind


def test_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_keeps_finished_work(write_recipe, monkeypatch):
    path = write_recipe(TRAIN)
    real_save = torch.save

    def fails_on_optimizer_state(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and "checkpoint-8" in str(f):
            raise RuntimeError(TORCH_WRITE)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_on_optimizer_state)
    result = cli("run", str(path))
    checkpoints = load_recipe(path).output_path / ".hfprune/train/continued/checkpoints"
    assert_one_line_failure(result, str(checkpoints), "the write failed", "rerun")
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    summary = pipeline.run(load_recipe(path))
    ran = [o.stage for o in summary.outcomes if o.ran]
    assert ran == ["train_continued", "continued_eval", "card"]  # parent eval and pruning are kept
    report = json.loads((summary.output_dir / "models/continued/training_report.json").read_text())
    assert report["resumed_from"] == "checkpoint-4" and report["tokens_trained"] == 2048


# -- out of memory on an accelerator ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "knob"),
    [
        ("train_continued", "train.args.per_device_train_batch_size"),
        ("train_scratch", "gradient_accumulation_steps"),
        ("parent_eval", "eval.batch_size"),
        ("pruned_eval", "eval.perplexity.N.seq_len"),
        ("prune", "calibration.batch_size"),
    ],
)
def test_out_of_memory_names_the_stage_and_the_knob(stage, knob):
    oom = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total\ncapacity"
    )
    with pytest.raises(OutOfMemory) as caught, translate_oom(stage):
        raise oom
    message = str(caught.value)
    assert caught.value.exit_code == 1 and caught.value.__cause__ is oom
    assert stage in message and knob in message and "2.00 GiB" in message and "\n" not in message


def test_other_backends_out_of_memory_and_other_errors():
    with pytest.raises(OutOfMemory, match="calibration.seq_len"), translate_oom("prune"):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)")
    bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as caught, translate_oom("prune"):
        raise bug
    assert caught.value is bug


# -- finding 3: one writer per output folder --------------------------------------------------------
def _hold_lock(out: Path, held, release) -> None:
    with output_lock(out):
        held.set()
        release.wait()


def test_a_second_writer_fails_at_once_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    fork = multiprocessing.get_context("fork")
    held, release = fork.Event(), fork.Event()
    holder = fork.Process(target=_hold_lock, args=(out, held, release))
    holder.start()
    try:
        assert held.wait(timeout=60)
        with (
            pytest.raises(OutputInUse, match=rf"in use by process {holder.pid} on ") as caught,
            output_lock(out),
        ):
            pass
        assert caught.value.exit_code == 1 and str(out) in str(caught.value)
    finally:
        holder.kill()  # SIGKILL: the holder never releases, its record stays in the lock file
        holder.join()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    with output_lock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        with output_lock(out):  # re-entering in the holding process is allowed
            pass
        assert (out / LOCK_FILE).exists()
    assert not (out / LOCK_FILE).exists()


def test_a_lock_on_a_new_folder_leaves_nothing_and_other_ranks_do_not_lock(tmp_path, monkeypatch):
    out = tmp_path / "new"
    with output_lock(out):
        assert (out / LOCK_FILE).is_file()
    assert not out.exists()
    monkeypatch.setenv("RANK", "1")
    with output_lock(out):
        assert not out.exists()


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(_fd, _operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with output_lock(tmp_path / "run"):
        pass
    assert any("a second run on it would not be stopped" in r.getMessage() for r in caplog.records)


# -- finding 8: temporaries a kill leaves, folder modes ---------------------------------------------
def _die_inside_atomic_dir(target: Path) -> None:
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)


def test_stale_temporaries_are_removed_and_a_set_aside_output_restored(tmp_path):
    out = tmp_path / "run"
    models = out / "models"
    child = multiprocessing.get_context("fork").Process(
        target=_die_inside_atomic_dir, args=(models / "pruned",)
    )
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    [killed] = list(models.iterdir())
    assert killed.name.startswith(".pruned.tmp-")
    for folder in (".continued.staging", ".scratch.old-77", ".pruned.tmp-a1b2c3d4"):  # the last: mkdtemp's
        (models / folder).mkdir()
        (models / folder / "config.json").write_text("{}")
    (out / ".metrics.json.tmp-123").write_text("{")
    (out / ".hfprune").mkdir()
    (out / ".hfprune" / ".stages.json.tmp-9").write_text("{")
    kept = [out / ".hfprune" / "lock", out / ".hidden", out / "notes.tmp-1"]
    for path in kept:
        path.write_text("mine")

    removed = remove_stale_temporaries(out)

    assert sorted(p.name for p in removed) == sorted(
        [
            killed.name,
            ".continued.staging",
            ".pruned.tmp-a1b2c3d4",
            ".metrics.json.tmp-123",
            ".stages.json.tmp-9",
        ]
    )
    assert sorted(p.name for p in models.iterdir()) == ["scratch"]  # set aside by a replace, put back
    assert (models / "scratch" / "config.json").read_text() == "{}"
    assert all(path.read_text() == "mine" for path in kept)


def test_finished_folders_get_the_ordinary_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "models" / "pruned") as tmp:
            (tmp / "config.json").write_text("{}")
        with distributed_staging_dir(tmp_path / "models" / "continued") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    for name in ("pruned", "continued"):
        assert stat.S_IMODE((tmp_path / "models" / name).stat().st_mode) == 0o755


# -- finding 5: run-time failures a user can fix are one line ----------------------------------------
@pytest.fixture
def parent_copy(tiny_parent_dir, tmp_path):
    copy = tmp_path / "parent"
    shutil.copytree(tiny_parent_dir, copy)
    return copy


def test_truncated_parent_weights(write_recipe, parent_copy):
    weights = parent_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = cli("run", str(write_recipe()), f"parent.model={parent_copy}")
    assert_one_line_failure(
        result, str(parent_copy), "truncated or corrupt", "download or save the parent again"
    )


def test_parent_that_needs_remote_code(write_recipe, parent_copy):
    config = json.loads((parent_copy / "config.json").read_text())
    config.update(
        model_type="fancy-llama",
        architectures=["FancyForCausalLM"],
        auto_map={"AutoConfig": "configuration_fancy.FancyConfig"},
    )
    (parent_copy / "config.json").write_text(json.dumps(config))
    result = cli("run", str(write_recipe()), f"parent.model={parent_copy}")
    assert_one_line_failure(result, str(parent_copy), "parent.trust_remote_code: true")


def test_dataset_file_that_is_not_json(write_recipe, tmp_path):
    data = tmp_path / "calibration.jsonl"
    data.write_text('{"text": "fine"}\nthese are words, not JSON\n')
    overrides = ["calibration.dataset.path=json", f"calibration.dataset.data_files={data}"]
    result = cli("prune", str(write_recipe()), *overrides)
    assert_one_line_failure(result, str(data), "JSON parse error", "row 1")


def test_output_dir_that_is_a_file(tmp_path):
    """Validation rejects such a recipe (exit 2); a file that appears later still fails in one line."""
    taken = tmp_path / "taken"
    taken.write_text("a file")
    writes = [
        lambda: write_json(taken / "metrics.json", {}),
        lambda: read_json(taken / ".hfprune" / "stages.json"),
        lambda: atomic_dir(taken / "models" / "pruned").__enter__(),
        lambda: output_lock(taken).__enter__(),
    ]
    for write in writes:
        with pytest.raises(
            OutputError, match=rf"{taken} is a file, not a folder; point output_dir at a folder"
        ):
            write()
    assert taken.read_text() == "a file"


# -- the pipeline takes the lock, clears what a kill left, and names the stage that ran out of memory --
def test_a_second_run_on_the_folder_fails_at_once_naming_the_holder(write_recipe):
    path = write_recipe()
    out = load_recipe(path).output_path
    fork = multiprocessing.get_context("fork")
    held, release = fork.Event(), fork.Event()
    holder = fork.Process(target=_hold_lock, args=(out, held, release))
    holder.start()
    try:
        assert held.wait(timeout=60)
        result = cli("run", str(path))
        assert_one_line_failure(result, f"output folder {out} is in use by process {holder.pid}")
        assert not (out / "models").exists() and not (out / "metrics.json").exists()  # no stage ran
    finally:
        release.set()
        holder.join()
    assert cli("prune", str(path)).exit_code == 0  # released: the next run proceeds


def test_a_sweep_locks_its_folder_while_writing_the_report(tmp_path, monkeypatch):
    from hfprune.sweep import runner as sweep

    seen = []
    monkeypatch.setattr(
        sweep, "write_report", lambda folder: seen.append((folder / LOCK_FILE).is_file()) or {}
    )
    (tmp_path / ".report.json.tmp-1").write_text("{")
    (tmp_path / "cell" / ".metrics.json.tmp-2").parent.mkdir()
    (tmp_path / "cell" / ".metrics.json.tmp-2").write_text("{")  # another process's cell: left alone
    assert sweep._locked_report(tmp_path) == {} and seen == [True]
    assert not (tmp_path / ".report.json.tmp-1").exists() and (tmp_path / "cell/.metrics.json.tmp-2").exists()


def test_the_next_run_removes_what_a_kill_left_and_keeps_finished_stages(write_recipe):
    path = write_recipe()
    recipe = load_recipe(path)
    pipeline.run(recipe, stop_after="prune")
    models = recipe.output_path / "models"
    (models / ".pruned.tmp-4242-deadbeef").mkdir()  # a save cut short by a kill
    (models / ".pruned.tmp-4242-deadbeef" / "model.safetensors").write_bytes(b"half")
    summary = pipeline.run(recipe, stop_after="prune")
    assert not any(o.ran for o in summary.outcomes)
    assert sorted(p.name for p in models.iterdir()) == ["pruned"]


def test_out_of_memory_in_a_stage_is_one_line_naming_it(write_recipe, monkeypatch):
    from hfprune.pipeline.stages import prune

    def oom(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")

    monkeypatch.setattr(prune, "prune_model", oom)
    result = cli("prune", str(write_recipe()))
    assert_one_line_failure(
        result, "out of memory in stage prune (tried to allocate 3.00 GiB)", "calibration.batch_size"
    )


def test_placement_does_not_make_finished_stages_stale(write_recipe):
    """`parent.device` is where work runs, not what it computes: a folder made with `auto` (or before the
    key existed) is current with `cpu`."""
    path = write_recipe()
    made = load_recipe(path)
    assert made.parent.device == "auto"
    pipeline.run(made, stop_after="prune")
    moved = load_recipe(path, ["parent.device=cpu"])
    assert set(pipeline.Pipeline(moved).status("prune").values()) == {"up to date"}
    assert not any(o.ran for o in pipeline.run(moved, stop_after="prune").outcomes)
    before_the_key = made.model_dump(mode="json")["parent"]
    for later in ("device", "pretrain", "pretrained_tokens"):  # added after this test's reference point
        before_the_key.pop(later)
    old = hashlib.sha256(json.dumps({"parent": before_the_key}, sort_keys=True).encode()).hexdigest()[:16]
    assert made.fingerprint("parent") == old
    assert made.fingerprint("parent") != load_recipe(path, ["parent.dtype=bfloat16"]).fingerprint("parent")
