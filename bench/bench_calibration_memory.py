"""Benchmark: peak host memory of calibration and pruning against the number of calibration windows.

Prunes the real SmolLM2-135M (the offline GGUF from `hfprune assets`) at ratio 0.5 with each calibrated
pruner (shortgpt, minitron_depth, minitron_width, flap, wanda, sparsegpt) on N calibration windows of
256 Shakespeare tokens, for each N requested (default 8, 32 and 128). Every (method, N) runs in a fresh
subprocess, so one run's heap never hides in the next; a thread samples the process's resident memory
(`results.PeakRSS`) while `pruner.prune` runs. The streaming methods should be flat in N; wanda and
sparsegpt hold at most their `max_activation_bytes` budget of hidden states and spill the rest to files.
The table goes into bench/RESULTS.md under `## Calibration memory`; other sections are left alone.

    .venv/bin/hfprune assets        # once: SmolLM2-135M GGUF and Shakespeare into .cache/hfprune
    .venv/bin/python bench/bench_calibration_memory.py [--windows 8 32 128] [--methods shortgpt ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
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


def one(method: str, windows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Load the parent, tokenize, prune once under the RSS sampler (runs inside the subprocess)."""
    import torch

    from hfprune.data import calibration_tokens
    from hfprune.hub import load_parent
    from hfprune.pruners import get_pruner
    from hfprune.recipe import DatasetSpec, ParentSpec

    torch.set_num_threads(args.threads)
    parent = load_parent(
        ParentSpec(model=f"{CACHE}/smollm2-135m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
    )
    train = DatasetSpec(path="json", data_files=f"{CACHE}/shakespeare/train.jsonl")
    ids = calibration_tokens(train, parent.tokenizer, windows, args.seq_len)
    options = dict(OPTIONS.get(method, {}))
    if method in SPARSE:
        options["max_activation_bytes"] = args.budget_mib * 2**20
    cls = get_pruner(method)
    pruner = cls(cls.Options(**options))
    before = PeakRSS.current()
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = pruner.prune(parent.model, ids, 0.5, args.batch_size)
        seconds = time.perf_counter() - start
    details = result.details
    return {
        "method": method,
        "windows": int(ids.shape[0]),
        "before": before,
        "peak": rss.peak,
        "seconds": seconds,
        "decision": decision(details),
        "activations": details.get("activations"),
    }


def decision(details: dict[str, Any]) -> str:
    """A short, comparable summary of what the pruner chose."""
    if "kept_layers" in details:
        return "kept layers " + ",".join(map(str, details["kept_layers"]))
    if "kept_hidden_channels" in details:
        return f"hidden {len(details['kept_hidden_channels'])}, ffn {len(details['kept_ffn_neurons'][0])}"
    if "kept_kv_groups" in details:
        return f"kv groups {len(details['kept_kv_groups'][0])}, ffn {len(details['kept_ffn_neurons'][0])}"
    return f"sparsity {details['sparsity']['sparsity']:.4f}"


def run_child(method: str, windows: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", method, str(windows), *child_flags(args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{method} x {windows} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--seq-len={args.seq_len}",
        f"--batch-size={args.batch_size}",
        f"--budget-mib={args.budget_mib}",
        f"--threads={args.threads}",
    ]


def mib(count: float) -> str:
    return f"{count / 2**20:.0f}"


def table(rows: list[dict[str, Any]], windows: list[int]) -> list[str]:
    cells = [f"{what}, N={n}" for what in ("peak RSS MiB", "rise MiB", "prune s") for n in windows]
    lines = [
        "| method | "
        + " | ".join(cells)
        + " | activations held / spilled at the largest N | same decision |",
        "|---|" + "---:|" * len(cells) + "---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = {r["windows"]: r for r in rows if r["method"] == method}
        runs = [mine.get(n) for n in windows]
        peak = [mib(r["peak"]) if r else "-" for r in runs]
        rise = [mib(r["peak"] - r["before"]) if r else "-" for r in runs]
        secs = [f"{r['seconds']:.0f}" if r else "-" for r in runs]
        last = mine[max(mine)]["activations"]
        held = f"{mib(last['held_bytes'])} / {mib(last['spilled_bytes'])} MiB" if last else "none (streamed)"
        same = len({r["decision"] for r in mine.values()}) == 1
        lines.append(
            f"| {method} | " + " | ".join([*peak, *rise, *secs, held, "yes" if same else "no"]) + " |"
        )
    return lines


def section(rows: list[dict[str, Any]], args: argparse.Namespace, total_s: float, load: str) -> str:
    command = shlex.join([".venv/bin/python", "bench/bench_calibration_memory.py", *sys.argv[1:]])
    now = "/".join(f"{x:.1f}" for x in os.getloadavg())
    setup = (
        f"Parent: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32, 538 MB of weights) on the CPU, "
        f"ratio 0.5. Calibration: Shakespeare train, windows of {args.seq_len} tokens, batch "
        f"{args.batch_size}. wanda and sparsegpt: `max_activation_bytes` = {args.budget_mib} MiB (one batch "
        f"of hidden states is {args.batch_size * args.seq_len * 576 * 4 / 2**20:.1f} MiB). Each cell is a "
        f"fresh process; whole run {total_s / 60:.1f} min."
    )
    notes = (
        "'peak RSS' is the whole process (parent, tokenizer, libraries, pruning), sampled every 5 ms while "
        "`prune` runs; 'rise' is that peak minus the RSS just before `prune`. 'activations held / spilled' "
        "is the sequential walk's report (`prune_report.json` `activations`) at the largest N. "
        "Times are on a shared machine and only comparable within a row."
    )
    rows_windows = sorted({r["windows"] for r in rows})
    head = [
        f"Machine: {machine()}; shared with other jobs: load average {load} at start, {now} at the end.  ",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}).  ",
    ]
    return "\n".join([*head, setup, "", *table(rows, rows_windows), "", notes, ""])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--depth-windows", type=int, nargs="+", help="windows for minitron_depth (default: --windows)"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget-mib", type=int, default=16, help="wanda/sparsegpt max_activation_bytes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "WINDOWS"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.chdir(ROOT)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        print(json.dumps(one(args.child[0], int(args.child[1]), args)), flush=True)
        return
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    begin, rows = time.perf_counter(), []
    for method in args.methods:
        counts = args.depth_windows if method == "minitron_depth" and args.depth_windows else args.windows
        for windows in counts:
            row = run_child(method, windows, args)
            print(f"[{(time.perf_counter() - begin) / 60:.1f} min] {row}", flush=True)
            rows.append(row)
    text = section(rows, args, time.perf_counter() - begin, load)
    print(text)
    if not args.no_write:
        replace_section(HEADING, text)


if __name__ == "__main__":
    main()
