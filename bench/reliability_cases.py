"""The invalid inputs and run-time faults of the reliability table (bench/reliability_table.py), and
what both halves of the table share: the scratch folder with the tiny parent, the local Hub server, and
the command line run in this process.

Importing this module points huggingface_hub at a local `FakeHub` (tests/fakehub.py) before it is
imported, so pushes go there and nothing leaves the machine.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="0")

from fakehub import FakeHub  # noqa: E402  (before huggingface_hub reads HF_ENDPOINT at import)


HUB = FakeHub(token="hf_table_token", user="tester")
os.environ.update(HF_ENDPOINT=HUB.start(), HF_TOKEN="hf_table_token")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import run_on_small_fs, tiny_model, tiny_recipe_yaml, train_tiny_tokenizer  # noqa: E402

from hfprune.cli import main  # noqa: E402
from hfprune.outputs import output_lock  # noqa: E402


torch.set_num_threads(1)
TRAIN = (
    "train:\n  runs: [continued]\n  token_budget: 1024\n  seq_len: 32\n"
    "  args: {per_device_train_batch_size: 4, save_steps: 2, learning_rate: 1.0e-3}\n"
)
PUSH = "push: {enabled: true, repo_prefix: tester/table-run}\n"


class Bench:
    """A scratch folder with the tiny parent and recipes on it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.parent = folder / "parent"
        tiny_model().save_pretrained(self.parent)
        train_tiny_tokenizer().save_pretrained(self.parent)

    def recipe(self, name: str, extra: str = TRAIN, parent: Path | None = None) -> Path:
        prune = "prune:\n  method: shortgpt\n  ratio: 0.5\n"
        text = tiny_recipe_yaml(name, self.folder / "out" / name, parent or self.parent, prune, max_windows=2)
        path = self.folder / f"{name}.yaml"
        path.write_text(text + extra)
        return path

    def out(self, name: str) -> Path:
        return self.folder / "out" / name


def error_report(stderr: str) -> str:
    """The error report (its first line and the problems listed under it), flagging any traceback."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    shown = " / ".join(line.strip() for line in lines[start:]) if start is not None else "no error line"
    return f"{shown}{' (with a traceback)' if 'Traceback' in stderr else ''}"


def cli(*args: str) -> str:
    """`hfprune ARGS` in this process: its exit code and error report, or the exception it let escape."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text = f"UNCAUGHT {type(result.exception).__name__}: {result.exception}"
    else:
        text = error_report(result.stderr) if result.exit_code else "finished"
    return f"exit {result.exit_code}: {cell(text, 400)}"


def cell(text: str, limit: int = 260) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def invalid_rows(bench: Bench) -> list[tuple[str, str]]:
    """Recipes and overrides `hfprune run` must refuse with exit 2 before loading any weights."""
    path = bench.recipe("invalid")
    latin = bench.folder / "latin.yaml"
    latin.write_bytes(path.read_bytes() + "# r\xe9sum\xe9\n".encode("latin-1"))
    huge = bench.folder / "huge.yaml"
    with huge.open("wb") as handle:
        handle.truncate(2 * 2**20)
    blocker = bench.folder / "a-file"
    blocker.write_text("not a folder")
    cases = [
        ("recipe not UTF-8", [str(latin)]),
        ("2 MB recipe", [str(huge)]),
        (
            "malformed overrides",
            [str(path), "prune.ratio=[0.5", "eval.perplexity.x=1", "eval.perplexity.5=1"],
        ),
        ("unknown key, misspelt method", [str(path), "prune.methd=x", "prune.method=shortgtp"]),
        ("ratio out of range", [str(path), "prune.ratio=1.5"]),
        ("zero batch size", [str(path), "train.args.per_device_train_batch_size=0"]),
        (
            "sequence lengths above the parent's 256 positions",
            [str(path), "train.seq_len=512", "calibration.seq_len=512", "eval.perplexity.0.seq_len=512"],
        ),
        ("budget below one optimizer step", [str(path), "train.token_budget=64"]),
        (
            "missing dataset file",
            [str(path), "calibration.dataset.path=json", "calibration.dataset.data_files=/nonexistent.jsonl"],
        ),
        ("output_dir is a file", [str(path), f"output_dir={blocker}"]),
        ("parent folder missing", [str(path), "parent.model=/nonexistent/parent"]),
    ]
    rows = []
    with mock.patch(
        "transformers.AutoModelForCausalLM.from_pretrained", side_effect=AssertionError("weights loaded")
    ):
        for what, args in cases:
            rows.append((what, cli("run", *args) + _nothing_written(bench.out("invalid"))))
    return rows


def _nothing_written(out: Path) -> str:
    return "; nothing written" if not out.exists() else "; OUTPUT WRITTEN"


def _broken_parent(bench: Bench, name: str, change: Callable[[Path], None]) -> Path:
    copy = bench.folder / name
    shutil.copytree(bench.parent, copy)
    change(copy)
    return copy


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _remote_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="fancy-llama", auto_map={"AutoConfig": "configuration_fancy.FancyConfig"})
    (folder / "config.json").write_text(json.dumps(config))


def _hold(out: Path, held: object, release: object) -> None:
    with output_lock(out):
        held.set()
        release.wait()


def second_writer(bench: Bench) -> str:
    path, out = bench.recipe("locked"), bench.out("locked")
    fork = multiprocessing.get_context("fork")
    held, release = fork.Event(), fork.Event()
    holder = fork.Process(target=_hold, args=(out, held, release))
    holder.start()
    held.wait(60)
    try:
        return cli("run", str(path)).replace(str(holder.pid), "<pid>")
    finally:
        release.set()
        holder.join()


# What the installed safetensors raises on a full disk (tests/test_failures.py captures it on a real one).
FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


def full_disk_at_checkpoint(bench: Bench) -> str:
    """A real full file system: `hfprune run` on a 64 MB tmpfs (`conftest.run_on_small_fs`), which another
    process fills once the first checkpoint is complete; then the folder moves to a larger disk and the
    run is resumed there."""
    path, out = bench.recipe("disk-checkpoint"), bench.out("disk-checkpoint")
    moved = bench.folder / "larger"
    fill = {"HFPRUNE_TEST_FILL_AT": "checkpoint_complete:1", "HFPRUNE_TEST_FILL_FILE": str(out / "neighbour")}
    argv = [sys.executable, "-m", "hfprune", "run", str(path)]
    done = run_on_small_fs(out, "64m", argv, copy_to=moved, env={**os.environ, "HF_HUB_OFFLINE": "1", **fill})
    first = f"exit {done.returncode}: {error_report(done.stderr)}"
    (moved / "neighbour").unlink(missing_ok=True)  # space is back: the same folder on a larger disk
    rerun = cli("run", str(path), f"output_dir={moved}")  # the tmpfs was the output folder itself
    metrics = json.loads((moved / "metrics.json").read_text())["continued"]
    resumed = metrics["training"].get("resumed_from")
    # The resume first: the table cuts long cells, and the error line is long.
    return (
        f"a real 64 MB disk, filled by another process after checkpoint 1; moved to a larger disk, rerun {rerun} "
        f"(resumed from {resumed}, {metrics['tokens_trained']} tokens); the run itself {first}"
    )


def full_disk_saving_pruned(bench: Bench) -> str:
    from safetensors import SafetensorError

    path = bench.recipe("disk-pruned", "")
    with mock.patch("transformers.modeling_utils.safe_save_file", side_effect=SafetensorError(FULL_DISK)):
        outcome = cli("prune", str(path))
    left = sorted(p.name for p in (bench.out("disk-pruned") / "models").iterdir())
    return f"{outcome}; models/ holds {left or 'nothing'}"


def out_of_memory(bench: Bench) -> str:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")
    with mock.patch("hfprune.pipeline.stages.prune.prune_model", side_effect=oom):
        return cli("prune", str(bench.recipe("oom", "")))


def stale_temporary(bench: Bench) -> str:
    path = bench.recipe("stale", "")
    cli("prune", str(path))
    leftover = bench.out("stale") / "models" / ".pruned.tmp-4242-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    outcome = cli("prune", str(path))
    return f"{outcome}; leftover {'removed' if not leftover.exists() else 'STILL THERE'}"


def dead_lock_holder(bench: Bench) -> str:
    path = bench.recipe("dead-holder", "")
    lock = bench.out("dead-holder") / ".hfprune" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(
        '{"pid": 999999, "host": "gone", "started": "2026-01-01T00:00:00", "command": "hfprune run"}'
    )
    return cli("prune", str(path)) + " (the lock of the dead process taken over)"


def sparse_parent(bench: Bench) -> str:
    from transformers import AutoModelForCausalLM

    from hfprune.masks.storage import load_masks, masks_from_zeros, save_masks

    def sparsify(folder: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(folder)
        masks = {name: torch.rand(model.get_parameter(name).shape) >= 0.4 for name in masks_from_zeros(model)}
        with torch.no_grad():
            for name, keep in masks.items():
                model.get_parameter(name).mul_(keep)
        model.save_pretrained(folder)
        save_masks(masks, folder / "sparsity_masks.safetensors")

    parent = _broken_parent(bench, "sparse-parent", sparsify)
    outcome = cli("run", str(bench.recipe("sparse", TRAIN, parent)))
    models = bench.out("sparse") / "models"
    masks = load_masks(models / "pruned" / "sparsity_masks.safetensors")
    trained = AutoModelForCausalLM.from_pretrained(models / "continued")
    zeros = sum(int((~keep).sum()) for keep in masks.values())
    filled = sum(int(trained.get_parameter(n)[~keep].count_nonzero()) for n, keep in masks.items())
    return f"{outcome}; {len(masks)} masks of the kept layers carried, {zeros} zeros, {filled} filled in by training"


def fault_rows(bench: Bench) -> list[tuple[str, str]]:
    data = bench.folder / "calibration.jsonl"
    data.write_text('{"text": "fine"}\nthese are words, not JSON\n')
    bad_masks = _broken_parent(
        bench, "bad-masks", lambda f: (f / "sparsity_masks.safetensors").write_bytes(b"junk")
    )
    cases: list[tuple[str, Callable[[], str]]] = [
        (
            "truncated parent model.safetensors",
            lambda: cli(
                "prune", str(bench.recipe("trunc", "", _broken_parent(bench, "trunc-parent", _truncate)))
            ),
        ),
        (
            "parent that needs trust_remote_code",
            lambda: cli(
                "prune", str(bench.recipe("remote", "", _broken_parent(bench, "remote-parent", _remote_code)))
            ),
        ),
        (
            "calibration file that is not JSON",
            lambda: cli(
                "prune",
                str(bench.recipe("json", "")),
                "calibration.dataset.path=json",
                f"calibration.dataset.data_files={data}",
            ),
        ),
        ("unreadable parent mask file", lambda: cli("prune", str(bench.recipe("bad-masks", "", bad_masks)))),
        ("full disk saving the pruned model", lambda: full_disk_saving_pruned(bench)),
        ("full disk at a training checkpoint", lambda: full_disk_at_checkpoint(bench)),
        ("out of memory while pruning", lambda: out_of_memory(bench)),
        ("a second run on a folder in use", lambda: second_writer(bench)),
        ("a lock left by a killed run", lambda: dead_lock_holder(bench)),
        ("a temporary left by a killed save", lambda: stale_temporary(bench)),
        ("sparse parent pruned by depth and trained", lambda: sparse_parent(bench)),
    ]
    return [(what, run()) for what, run in cases]
