"""Benchmark of the structured pruners on the real SmolLM2-135M: shape, quality and wall time at one ratio.

Prunes the parent with `minitron_depth`, `minitron_width` and `flap` (without and with attention bias
compensation), measures held-out perplexity (Shakespeare test split) of the parent and of each pruned
model, the pruning wall time, the achieved non-embedding ratio and parameter counts, checks that each
checkpoint reloads with plain `AutoModelForCausalLM.from_pretrained` to the same logits, and writes the
table into bench/RESULTS.md under `## Structured pruners` (other sections of that file are left alone).

    .venv/bin/hfprune assets        # once: SmolLM2-135M GGUF and Shakespeare into .cache/hfprune
    .venv/bin/python bench/bench_structured.py
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from hfprune.data import calibration_tokens
from hfprune.eval import evaluation_windows, perplexity
from hfprune.hub import load_parent
from hfprune.modeling import count_parameters
from hfprune.pruners import get_pruner
from hfprune.recipe import DatasetSpec, ParentSpec


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## Structured pruners"
CACHE = ".cache/hfprune"
# SmolLM2 has 9 query heads: with alignment 64 the only legal hidden size is 576 itself (LlamaConfig
# needs hidden % heads == 0), so width pruning uses multiples of lcm(8, 9) = 72 for hidden here.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "minitron_depth": ("minitron_depth", {}),
    "minitron_width": ("minitron_width", {"alignment": 8}),
    "flap": ("flap", {}),
    "flap + attention bias": ("flap", {"bias_compensation": "attention"}),
}


def machine() -> str:
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} CPU cores, {mem_gib:.0f} GiB, {gpu}; torch {torch.__version__}; load {load:.1f} at start"


def shape_summary(config: Any) -> str:
    return (
        f"L{config.num_hidden_layers} h{config.hidden_size} ffn{config.intermediate_size} "
        f"heads {config.num_attention_heads}/{config.num_key_value_heads}"
    )


def reloads_identically(model: Any, ids: torch.Tensor) -> bool:
    """Save, reload with plain transformers, and compare logits on a few tokens exactly."""
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model.save_pretrained(folder)
        again = AutoModelForCausalLM.from_pretrained(folder).eval()
        return torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def prune_one(parent: Any, ids: torch.Tensor, method: str, options: dict, args: argparse.Namespace) -> dict:
    cls = get_pruner(method)
    result = cls(cls.Options(**options)).prune(copy.deepcopy(parent), ids, args.ratio, args.batch_size)
    after = count_parameters(result.model)
    return {
        "model": result.model.eval(),
        "seconds": result.seconds,
        "ratio": result.shape.ratio_achieved,
        "params": after.total,
        "non_embedding": after.non_embedding,
        "shape": shape_summary(result.model.config),
        "reloads": reloads_identically(result.model, ids[:1, :32]),
    }


def evaluate(model: Any, windows: tuple[torch.Tensor, bool], batch_size: int) -> float:
    batch, bos = windows
    return perplexity(model, batch, bos, {"path": "shakespeare test"}, batch_size).value


def section(rows: list[dict], parent: dict, args: argparse.Namespace, started: str) -> str:
    command = shlex.join([".venv/bin/python", "bench/bench_structured.py", *sys.argv[1:]])
    lines = [
        HEADING,
        "",
        f"Machine: {started}.  ",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}).  ",
        (
            f"Parent: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), {parent['shape']}, "
            f"{parent['params'] / 1e6:.1f}M parameters ({parent['non_embedding'] / 1e6:.1f}M non-embedding), "
            f"perplexity **{parent['ppl']:.2f}**. Requested ratio {args.ratio} (non-embedding parameters removed).  "
        ),
        (
            f"Calibration: Shakespeare train, {args.samples} x {args.seq_len} tokens, batch {args.batch_size}. "
            f"Perplexity: Shakespeare test (Hamlet), {args.windows} windows of {args.seq_len} tokens with BOS."
        ),
        "",
        "| method | options | shape | params (M) | non-emb (M) | ratio achieved | perplexity | prune s | reloads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        cells = [
            r["label"],
            options,
            r["shape"],
            f"{r['params'] / 1e6:.1f}",
            f"{r['non_embedding'] / 1e6:.1f}",
            f"{r['ratio']:.4f}",
            f"{r['ppl']:.2f}",
            f"{r['seconds']:.1f}",
            "yes" if r["reloads"] else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            "One-shot numbers before any training. Prune time includes scoring (minitron_depth: one calibration "
            "perplexity pass per candidate block start). 'reloads' means the saved checkpoint loads with plain "
            "transformers and reproduces the pruned model's logits exactly."
        ),
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) only this file's `## Structured pruners` section; other sections stay as they are."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == HEADING), None)
    if start is None:
        path.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text + ("\n" + rest if rest else ""))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)
    started = machine()
    parent = load_parent(
        ParentSpec(model=f"{CACHE}/smollm2-135m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
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
    for label in args.cases:
        method, options = CASES[label]
        row = {"label": label, "options": options, **prune_one(parent.model, ids, method, options, args)}
        row["ppl"] = evaluate(row.pop("model"), windows, args.batch_size)
        print(row, flush=True)
        rows.append(row)
    text = section(rows, summary, args, started)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
