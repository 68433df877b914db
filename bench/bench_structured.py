"""Benchmark of the structured pruners on the real SmolLM2-135M: shape, quality, wall time and memory.

Prunes the parent with `shortgpt`, `minitron_depth`, `minitron_width` and `flap` (without and with
attention bias compensation) at each requested ratio (default 0.5 and 0.8), and records for every run
the pruning wall time (calibration forward passes, scoring and surgery), the peak resident memory while
pruning, the achieved non-embedding ratio and parameter counts measured on the pruned model, one-shot
held-out perplexity (Shakespeare test split, Hamlet), and whether the checkpoint reloads with plain
`AutoModelForCausalLM.from_pretrained` to the same logits. The table goes into bench/RESULTS.md under
`## Structured pruners`; other sections of that file are left alone.

    .venv/bin/hfprune assets        # once: SmolLM2-135M GGUF and Shakespeare into .cache/hfprune
    .venv/bin/python bench/bench_structured.py [--ratios 0.5 0.8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results import PeakRSS, evaluate, machine, replace_section
from transformers import AutoModelForCausalLM

from hfprune.data.texts import calibration_tokens
from hfprune.eval.perplexity import evaluation_windows
from hfprune.hub import load_parent
from hfprune.models.structure import count_parameters
from hfprune.pruners import get_pruner
from hfprune.recipe.base import DatasetSpec
from hfprune.recipe.schema import ParentSpec


ROOT = Path(__file__).resolve().parents[1]
HEADING = "Structured pruners"
CACHE = ".cache/hfprune"
# SmolLM2 has 9 query heads: with alignment 64 the only legal hidden size is 576 itself (LlamaConfig
# needs hidden % heads == 0), so width pruning uses multiples of lcm(8, 9) = 72 for hidden here.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "shortgpt": ("shortgpt", {}),
    "minitron_depth": ("minitron_depth", {}),
    "minitron_width": ("minitron_width", {"alignment": 8}),
    "flap": ("flap", {}),
    "flap + attention bias": ("flap", {"bias_compensation": "attention"}),
}


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so one run's RSS does not hide in the next."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def shape_summary(config: Any) -> str:
    return (
        f"L{config.num_hidden_layers} h{config.hidden_size} ffn{config.intermediate_size} "
        f"heads {config.num_attention_heads}/{config.num_key_value_heads}"
    )


def removed_layers(details: dict, layers: int) -> str:
    """Parent layers a depth pruner removed, as compact ranges ("3-17, 20"); empty for width pruners."""
    if "kept_layers" not in details:
        return ""
    gone = sorted(set(range(layers)) - set(details["kept_layers"]))
    runs: list[list[int]] = []
    for i in gone:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def reloads_identically(model: Any, ids: torch.Tensor) -> bool:
    """Save, reload with plain transformers, and compare logits on a few tokens exactly."""
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model.save_pretrained(folder)
        again = AutoModelForCausalLM.from_pretrained(folder).eval()
        return torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def prune_one(
    parent: Any, ids: torch.Tensor, method: str, options: dict, ratio: float, batch_size: int
) -> dict:
    cls = get_pruner(method)
    pruner = cls(cls.Options(**options))
    before_counts = count_parameters(parent)
    release_freed_memory()
    model = copy.deepcopy(parent)  # the parent stays intact for the next run; the copy is not timed
    before = PeakRSS.current()
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = pruner.prune(model, ids, ratio, batch_size)
        seconds = time.perf_counter() - start
    after = count_parameters(result.model)
    measured = 1.0 - after.non_embedding / before_counts.non_embedding
    if abs(measured - result.shape.ratio_achieved) > 1e-6:
        print(f"warning: {method} planned ratio {result.shape.ratio_achieved:.6f}, measured {measured:.6f}")
    removed = removed_layers(result.details, parent.config.num_hidden_layers)
    shape = shape_summary(result.model.config) + (f" (removed {removed})" if removed else "")
    return {
        "model": result.model.eval(),
        "seconds": seconds,
        "peak_gib": rss.peak / 2**30,
        "rise_gib": (rss.peak - before) / 2**30,
        "ratio": measured,
        "params": after.total,
        "non_embedding": after.non_embedding,
        "shape": shape,
        "samples": ids.shape[0],
        "blocks": len(result.details.get("block_perplexity", [])),  # minitron_depth's candidate starts
        "reloads": reloads_identically(result.model, ids[:1, :32]),
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        (
            "| ratio | method | options | calibration | shape | params (M) | non-emb (M) | ratio achieved | "
            "perplexity | prune s | peak RSS GiB | RSS rise GiB | reloads |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r['requested']}",
            r["label"],
            ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults",
            f"{r['samples']} x {r['seq_len']}",
            r["shape"],
            f"{r['params'] / 1e6:.1f}",
            f"{r['non_embedding'] / 1e6:.1f}",
            f"{r['ratio']:.4f}",
            f"{r['ppl']:.2f}",
            f"{r['seconds']:.1f}",
            f"{r['peak_gib']:.2f}",
            f"{r['rise_gib']:.2f}",
            "yes" if r["reloads"] else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def section(rows: list[dict], parent: dict, args: argparse.Namespace, total_s: float) -> str:
    command = shlex.join([".venv/bin/python", "bench/bench_structured.py", *sys.argv[1:]])
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    shared = f"shared with other jobs: load average {args.load_at_start} at start, {load} at the end"
    blocks = ", ".join(f"{r['blocks']} at ratio {r['requested']}" for r in rows if r["blocks"]) or "none run"
    setup = (
        f"Parent: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), {parent['shape']}, "
        f"{parent['params'] / 1e6:.1f}M parameters ({parent['non_embedding'] / 1e6:.1f}M non-embedding), "
        f"perplexity **{parent['ppl']:.2f}**. Requested ratios {' and '.join(map(str, args.ratios))} "
        "(fraction of non-embedding parameters removed)."
    )
    data = (
        f"Calibration: Shakespeare train, {args.samples} windows of {args.seq_len} tokens, batch "
        f"{args.batch_size}; minitron_depth uses only the first {args.depth_samples} of them, because it runs "
        f"one calibration perplexity pass per candidate block start ({blocks}, plus one for the parent). "
        f"Perplexity: Shakespeare test (Hamlet), {args.windows} windows of {args.seq_len} tokens "
        f"with BOS. Whole script: {total_s / 60:.1f} min."
    )
    notes = (
        "One-shot numbers before any training. 'prune s' is the wall time of the pruner's `prune` call: "
        "calibration forward passes, scoring and surgery (tokenizing the calibration text is done once "
        "beforehand and not counted). 'ratio achieved' is 1 - non-embedding parameters of the pruned model / "
        "those of the parent, counted on the models. Memory is sampled from /proc/self/statm every 5 ms by a "
        "thread while `prune` runs: 'peak RSS' is the whole process (parent, the copy being pruned, calibration "
        "tokens and the working set), 'RSS rise' is that peak minus the RSS just before `prune` (after freed "
        "memory was returned with malloc_trim), i.e. the extra memory the pruner needs. 'reloads' means the "
        "saved checkpoint loads with plain transformers and reproduces the pruned model's logits exactly. "
        "Times are on a shared machine (load above) and only comparable within this table."
    )
    head = [f"Machine: {machine()}; {shared}.  ", f"Command: `{command}` ({time.strftime('%Y-%m-%d')}).  "]
    return "\n".join([*head, setup + "  ", data, "", *table(rows), "", notes, ""])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument(
        "--depth-samples", type=int, default=8, help="calibration windows for minitron_depth (the first N)"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--windows", type=int, default=32, help="held-out perplexity windows")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    if not 0 < args.depth_samples <= args.samples:
        parser.error("--depth-samples must be between 1 and --samples")
    return args


def main() -> None:
    args = parse_args()
    args.load_at_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    begin = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)
    parent = load_parent(
        ParentSpec(model=f"{CACHE}/smollm2-135m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    parent.model.eval()
    train = DatasetSpec(path="json", data_files=f"{CACHE}/shakespeare/train.jsonl")
    test = DatasetSpec(path="json", data_files=f"{CACHE}/shakespeare/test.jsonl")
    ids = calibration_tokens(train, parent.tokenizer, args.samples, args.seq_len)
    windows = evaluation_windows(test, parent.tokenizer, args.seq_len, args.windows)
    counts = count_parameters(parent.model)
    summary = {
        "shape": shape_summary(parent.model.config),
        "params": counts.total,
        "non_embedding": counts.non_embedding,
        "ppl": evaluate(parent.model, windows, args.batch_size),
    }
    print(f"parent: {summary}", flush=True)
    rows = []
    for ratio in args.ratios:
        for label in args.cases:
            method, options = CASES[label]
            calibration = ids[: args.depth_samples] if method == "minitron_depth" else ids
            row = {
                "requested": ratio,
                "label": label,
                "options": options,
                "seq_len": args.seq_len,
                **prune_one(parent.model, calibration, method, options, ratio, args.batch_size),
            }
            row["ppl"] = evaluate(row.pop("model"), windows, args.batch_size)
            print(f"[{(time.perf_counter() - begin) / 60:.1f} min] {row}", flush=True)
            rows.append(row)
    text = section(rows, summary, args, time.perf_counter() - begin)
    print(text)
    if not args.no_write:
        replace_section(HEADING, text)


if __name__ == "__main__":
    main()
