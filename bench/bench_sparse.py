"""Benchmark of the sparse pruners on the real SmolLM2-135M: one-shot quality, wall time, memory.

Prunes the parent with `magnitude`, `wanda` and `sparsegpt` at 50% sparsity (unstructured, 2:4, 4:8),
measures held-out perplexity (Shakespeare test split), wall time split into calibration forward
passes and pruning math, and peak resident memory while pruning, and writes the table into
bench/RESULTS.md under `## Sparse pruners` (other sections of that file are left as they are).

    .venv/bin/hfprune assets        # once: SmolLM2-135M GGUF and Shakespeare into .cache/hfprune
    .venv/bin/python bench/bench_sparse.py
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from results import PeakRSS, evaluate, machine, replace_section

from hfprune.data.texts import calibration_tokens
from hfprune.eval.perplexity import evaluation_windows
from hfprune.hub import load_parent
from hfprune.pruners import get_pruner
from hfprune.recipe.base import DatasetSpec
from hfprune.recipe.schema import ParentSpec


ROOT = Path(__file__).resolve().parents[1]
CACHE = ".cache/hfprune"
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4", "4:8")


def plain_forward_seconds(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """One ordinary forward pass over the calibration set: the yardstick for pruning time."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in ids.split(batch_size):
            model.model(input_ids=batch, use_cache=False)  # decoder only: calibration never needs the head
    return time.perf_counter() - start


def prune_one(parent: Any, ids: torch.Tensor, method: str, pattern: str, args: argparse.Namespace) -> dict:
    cls = get_pruner(method)
    pruner = cls(cls.Options(pattern=pattern))
    model = copy.deepcopy(parent)
    before = PeakRSS.current()
    with PeakRSS() as rss:
        result = pruner.prune(model, ids if pruner.needs_calibration else None, args.ratio, args.batch_size)
    report = result.details["sparsity"]
    assert report["masked_nonzero"] == 0 and report["pattern"] == pattern, report["pattern"]
    return {
        "model": result.model,
        "seconds": result.seconds,
        "timing": result.details["timing_seconds"],
        "peak_gib": rss.peak / 2**30,
        "extra_gib": (rss.peak - before) / 2**30,
        "sparsity": report["sparsity"],
        "ratio_achieved": result.shape.ratio_achieved,
    }


def table_rows(rows: list[dict]) -> list[str]:
    lines = [
        (
            "| method | pattern | linear sparsity | non-embedding removed | perplexity | prune s | "
            "stats fwd s | math s | pruned fwd s | peak RSS GiB | RSS over model GiB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("timing", {})
        cells = [
            r["method"],
            r["pattern"],
            f"{r['sparsity']:.4f}",
            f"{r['ratio_achieved']:.4f}",
            f"{r['ppl']:.2f}",
            f"{r['seconds']:.1f}",
            *(f"{t[k]:.1f}" if k in t else "-" for k in ("statistics_forward", "pruning", "pruned_forward")),
            f"{r['peak_gib']:.2f}",
            f"{r['extra_gib']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def section(rows: list[dict], dense_ppl: float, forward_s: float, args: argparse.Namespace) -> str:
    command = shlex.join([".venv/bin/python", "bench/bench_sparse.py", *sys.argv[1:]])
    setup = (
        f"Parent: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), ratio {args.ratio}. "
        f"Calibration: Shakespeare train, {args.samples} x {args.seq_len} tokens, batch {args.batch_size}. "
        f"Perplexity: Shakespeare test, {args.windows} windows of {args.seq_len} tokens with BOS."
    )
    yardstick = (
        f"Dense parent perplexity: **{dense_ppl:.2f}**. One plain decoder forward pass over the calibration "
        f"set takes {forward_s:.1f} s; sequential pruning runs each layer twice (statistics, then pruned "
        "outputs for the next layer), so its floor is about twice that plus the math."
    )
    phases = (
        "'stats fwd' is the layer's forward with hooks; for sparsegpt it includes accumulating X^T X for "
        "each input group (the down_proj Hessian alone costs about as much as the layer's forward here). "
        "'math' is mask selection and, for sparsegpt, the fp32 Cholesky inverse and the OBS column sweep. "
        "'pruned fwd' recomputes the layer's outputs from the pruned weights for the next layer."
    )
    memory = (
        "Peak RSS is the process's resident memory while pruning (the parent, its copy being pruned and the "
        "working set); the last column is the rise over the RSS just before pruning."
    )
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    shared = f"shared with other jobs: load average {args.load_at_start} at start, {load} at the end"
    head = [f"Machine: {machine()}; {shared}.  "]
    head.append(f"Command: `{command}` ({time.strftime('%Y-%m-%d')}).  ")
    return "\n".join([*head, setup + "  ", yardstick, "", *table_rows(rows), "", phases, memory, ""])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.load_at_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)
    spec = ParentSpec(model=f"{CACHE}/smollm2-135m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    parent = load_parent(spec)
    train = DatasetSpec(path="json", data_files=f"{CACHE}/shakespeare/train.jsonl")
    test = DatasetSpec(path="json", data_files=f"{CACHE}/shakespeare/test.jsonl")
    ids = calibration_tokens(train, parent.tokenizer, args.samples, args.seq_len)
    windows = evaluation_windows(test, parent.tokenizer, args.seq_len, args.windows)
    forward_s = plain_forward_seconds(parent.model, ids, args.batch_size)
    dense_ppl = evaluate(parent.model, windows, args.batch_size)
    print(f"dense: ppl {dense_ppl:.2f}; plain calibration forward {forward_s:.1f} s", flush=True)
    rows = []
    for method in args.methods:
        for pattern in args.patterns:
            row = {
                "method": method,
                "pattern": pattern,
                **prune_one(parent.model, ids, method, pattern, args),
            }
            row["ppl"] = evaluate(row.pop("model"), windows, args.batch_size)
            print(row, flush=True)
            rows.append(row)
    text = section(rows, dense_ppl, forward_s, args)
    print(text)
    print(f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if not args.no_write:
        replace_section("Sparse pruners", text)


if __name__ == "__main__":
    main()
