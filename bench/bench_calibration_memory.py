"""Benchmark: peak host memory of calibration and pruning against the number of calibration windows.

Prunes the real SmolLM2-135M (the offline GGUF from `hfprune assets`) at ratio 0.5 with each calibrated
pruner (shortgpt, minitron_depth, minitron_width, flap, wanda, sparsegpt) on N calibration windows of
256 Shakespeare tokens, for each N requested (default 8, 32 and 128). Every (method, N) runs in a fresh
subprocess, so one run's heap never hides in the next; a thread samples the process's resident memory
(`results.PeakRSS`) while `pruner.prune` runs. The streaming methods should be flat in N; wanda and
sparsegpt hold at most their `max_activation_bytes` budget of hidden states and spill the rest to files.
`--before REF` adds rows for the `hfprune` package of a git ref, on the same inputs. The table goes into
bench/RESULTS.md under `## Calibration memory`; other sections are left alone.

    .venv/bin/hfprune assets        # once: SmolLM2-135M GGUF and Shakespeare into .cache/hfprune
    .venv/bin/python bench/bench_calibration_memory.py [--windows 8 32 128] [--methods shortgpt ...]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results import PeakRSS, machine, replace_section


ROOT = Path(__file__).resolve().parents[1]
HEADING = "Calibration memory"
CACHE = ".cache/hfprune"
METHODS = ("shortgpt", "minitron_depth", "minitron_width", "flap", "wanda", "sparsegpt")
# SmolLM2 has 9 query heads: hidden sizes must be multiples of lcm(8, 9) = 72 (see bench_structured).
OPTIONS: dict[str, dict[str, Any]] = {"minitron_width": {"alignment": 8}}
SPARSE = ("wanda", "sparsegpt")


# -- inside one subprocess --------------------------------------------------------------------------
def one(method: str, windows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Load the prepared parent and tokens, prune once under the RSS sampler."""
    import torch

    import hfprune
    from hfprune.hub import load_parent
    from hfprune.pruners import get_pruner
    from hfprune.recipe.schema import ParentSpec

    torch.set_num_threads(args.threads)
    fields = {"device": "cpu"} if "device" in ParentSpec.model_fields else {}  # older code: no parent.device
    parent = load_parent(ParentSpec(model=str(args.prepared), **fields))
    for param in parent.model.parameters():  # into anonymous memory: a lazily mapped file would page in
        param.data = param.data.clone()  # during `prune` and read as the pruner's memory
    release_freed_memory()
    ids = torch.load(args.prepared / "calibration.pt")[:windows]
    cls = get_pruner(method)
    options = dict(OPTIONS.get(method, {}))
    if "max_activation_bytes" in cls.Options.model_fields:
        options["max_activation_bytes"] = args.budget_mib * 2**20
    pruner = cls(cls.Options(**options))
    before = PeakRSS.current()
    start = time.perf_counter()
    with PeakRSS() as calibration:  # calibration and scoring; for sequential sparse methods, the whole prune
        scores = pruner.score_for_ratios(parent.model, ids, [0.5], args.batch_size)
        result = pruner.prune(parent.model, ids, 0.5, args.batch_size) if scores is None else None
    with PeakRSS() as surgery:  # building the pruned model from the scores (no calibration data involved)
        result = result or pruner.apply(parent.model, scores, 0.5)
    seconds = time.perf_counter() - start
    ours = Path(hfprune.__file__).resolve().is_relative_to(ROOT)
    return {
        "method": method,
        "code": "this" if ours else args.label,
        "windows": int(ids.shape[0]),
        "before": before,
        "peak": calibration.peak,
        "surgery_peak": surgery.peak if scores is not None else None,
        "seconds": seconds,
        "decision": decision(result.details, result.masks),
        "activations": result.details.get("activations"),
    }


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS before the baseline is read."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def decision(details: dict[str, Any], masks: dict[str, Any] | None) -> str:
    """A short, comparable summary of what the pruner chose: the kept layers, else a digest of the kept
    channels or of the masks."""
    if "kept_layers" in details:
        return "kept layers " + ",".join(map(str, details["kept_layers"]))
    digest = hashlib.sha256()
    if masks:
        for name in sorted(masks):
            digest.update(name.encode() + masks[name].numpy().tobytes())
    else:
        digest.update(json.dumps({k: v for k, v in details.items() if k.startswith("kept_")}).encode())
    return f"sha256 {digest.hexdigest()[:12]}"


# -- the driver ----------------------------------------------------------------------------------------
def prepare(folder: Path, windows: int, seq_len: int) -> None:
    """Dequantize the GGUF parent into an ordinary checkpoint and tokenize the calibration set, once."""
    import torch

    from hfprune.data.texts import calibration_tokens
    from hfprune.hub import load_parent
    from hfprune.recipe.base import DatasetSpec
    from hfprune.recipe.schema import ParentSpec

    spec = ParentSpec(
        model=f"{CACHE}/smollm2-135m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu"
    )
    parent = load_parent(spec)
    parent.model.save_pretrained(folder)
    parent.tokenizer.save_pretrained(folder)
    train = DatasetSpec(path="json", data_files=f"{CACHE}/shakespeare/train.jsonl")
    torch.save(calibration_tokens(train, parent.tokenizer, windows, seq_len), folder / "calibration.pt")


def previous_code(ref: str, folder: Path) -> Path:
    """The `hfprune` package as of git `ref`, unpacked into `folder` (for the 'before' rows)."""
    archive = subprocess.run(["git", "archive", ref, "hfprune"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def run_child(method: str, windows: int, args: argparse.Namespace, code: Path | None) -> dict[str, Any]:
    flags = [
        f"--seq-len={args.seq_len}",
        f"--batch-size={args.batch_size}",
        f"--budget-mib={args.budget_mib}",
        f"--threads={args.threads}",
        f"--prepared={args.prepared}",
        f"--label=before ({args.before})",
    ]
    # Two malloc arenas: per-thread arenas make the peak depend on which thread allocated what.
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2"}
    # A fixed mmap threshold: large blocks are mapped and unmapped at once, so RSS follows live memory
    # (glibc's adaptive threshold would keep freed tensors in the heap and make the peak history-dependent).
    env["MALLOC_MMAP_THRESHOLD_"] = str(256 * 1024)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    command = [sys.executable, __file__, "--child", method, str(windows), *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{method} x {windows} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(count: float) -> str:
    return f"{count / 2**20:.0f}"


def table(rows: list[dict[str, Any]], windows: list[int]) -> list[str]:
    cells = [f"{what}, N={n}" for what in ("peak RSS MiB", "rise MiB", "prune s") for n in windows]
    tail = ["surgery rise MiB (largest N)", "activations held / spilled (largest N)", "same decisions"]
    lines = [
        "| method | " + " | ".join([*cells, *tail]) + " |",
        "|---|" + "---:|" * (len(cells) + 1) + "---|---|",
    ]
    for method, code in dict.fromkeys((r["method"], r["code"]) for r in rows):
        mine = {r["windows"]: r for r in rows if (r["method"], r["code"]) == (method, code)}
        runs = [mine.get(n) for n in windows]
        peak = [mib(r["peak"]) if r else "-" for r in runs]
        rise = [mib(r["peak"] - r["before"]) if r else "-" for r in runs]
        secs = [f"{r['seconds']:.0f}" if r else "-" for r in runs]
        last = mine[max(mine)]
        surgery = mib(last["surgery_peak"] - last["before"]) if last.get("surgery_peak") else "(in prune)"
        acts = last["activations"]
        held = f"{mib(acts['held_bytes'])} / {mib(acts['spilled_bytes'])} MiB" if acts else "none (streamed)"
        others = {(r["windows"], r["decision"]) for r in rows if r["method"] == method and r["code"] != code}
        ours = {(n, r["decision"]) for n, r in mine.items() if n in {w for w, _ in others}}
        same = "-" if not others else "yes" if others == ours else "no"
        label = method if code == "this" else f"{method}, {code}"
        lines.append(f"| {label} | " + " | ".join([*peak, *rise, *secs, surgery, held, same]) + " |")
    return lines


def section(rows: list[dict[str, Any]], args: argparse.Namespace, total_s: float, load: str) -> str:
    command = shlex.join([".venv/bin/python", "bench/bench_calibration_memory.py", *sys.argv[1:]])
    now = "/".join(f"{x:.1f}" for x in os.getloadavg())
    before = (
        f" Rows marked 'before' run the `hfprune` package of git `{args.before}` (layer-by-layer calibration "
        "that holds every window's hidden states) on the same inputs."
        if args.before
        else ""
    )
    setup = (
        "Parent: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32 once, then loaded from that checkpoint "
        f"by every cell; 538 MB of weights) on the CPU, ratio 0.5. Calibration: Shakespeare train, N windows of "
        f"{args.seq_len} tokens, batch {args.batch_size}. wanda and sparsegpt: `max_activation_bytes` = "
        f"{args.budget_mib} MiB (one batch of hidden states is "
        f"{args.batch_size * args.seq_len * 576 * 4 / 2**20:.2f} MiB). Each cell is a fresh process; whole run "
        f"{total_s / 60:.1f} min.{before}"
    )
    largest = max(r["windows"] for r in rows)
    held = 2 * args.seq_len * 576 * 4
    formula = (
        f"For scale: before this change calibration held every window's hidden states, inputs and outputs "
        f"({held / 2**20:.2f} MiB per window of {args.seq_len} tokens in fp32, {largest * held / 2**20:.0f} MiB "
        f"at N={largest}), on top of the same working set."
    )
    notes = (
        "'peak RSS' is the whole process (parent in float32, tokenizer, libraries), sampled every 5 ms "
        "during calibration and scoring (`score_for_ratios`; for wanda and sparsegpt, whose calibration is "
        "interleaved with pruning, the whole sequential `prune`, masks included); 'rise' is that peak minus "
        "the RSS just before. 'surgery rise' is the same while `apply` builds the pruned model from the "
        "scores (no calibration data involved). 'prune s' is scoring plus surgery. 'activations held / spilled' "
        "is the sequential walk's report (`prune_report.json` `activations`) at the largest N. 'same "
        "decisions': the kept layers, channels or masks equal those of the other code's row at every N both "
        "ran. Times are on a shared machine and only comparable within a row."
    )
    head = [
        f"Machine: {machine()}; shared with other jobs: load average {load} at start, {now} at the end.  ",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}).  ",
    ]
    windows = sorted({r["windows"] for r in rows})
    return "\n".join([*head, setup, "", *table(rows, windows), "", notes + " " + formula, ""])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--windows-for",
        nargs="+",
        default=[],
        metavar="METHOD=N,N",
        help="other window counts for the slow methods, e.g. minitron_depth=2,8",
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget-mib", type=int, default=16, help="wanda/sparsegpt max_activation_bytes")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--before", help="also measure the hfprune package of this git ref (e.g. a commit)")
    parser.add_argument("--before-methods", nargs="+", default=["shortgpt", "wanda"], choices=METHODS)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "WINDOWS"), help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        args.per_method = {
            k: [int(n) for n in v.split(",")] for k, v in (i.split("=") for i in args.windows_for)
        }
    except ValueError:
        parser.error("--windows-for takes METHOD=N,N,... items")
    if unknown := set(args.per_method) - set(METHODS):
        parser.error(f"--windows-for: unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    return args


def main() -> None:
    args = parse_args()
    os.chdir(ROOT)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        print(json.dumps(one(args.child[0], int(args.child[1]), args)), flush=True)
        return
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    begin, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="hfprune-bench-") as scratch:
        args.prepared = Path(scratch) / "parent"
        largest = max([*args.windows, *(n for counts in args.per_method.values() for n in counts)])
        prepare(args.prepared, largest, args.seq_len)
        runs: list[tuple[str, Path | None]] = [(m, None) for m in args.methods]
        if args.before:
            code = previous_code(args.before, Path(scratch))
            runs += [(m, code) for m in args.before_methods]
        for method, code in runs:
            counts = args.per_method.get(method, args.windows)
            for windows in counts:
                row = run_child(method, windows, args, code)
                print(f"[{(time.perf_counter() - begin) / 60:.1f} min] {row}", flush=True)
                rows.append(row)
    text = section(rows, args, time.perf_counter() - begin, load)
    print(text)
    if not args.no_write:
        replace_section(HEADING, text)


if __name__ == "__main__":
    main()
