"""Cost and result of the recovery kinds: distillation and LoRA against plain training, in one run.

Cost: step time and peak memory of a training step as a ratio to plain training. Each arm (plain,
distill, lora) trains a SmolLM2-135M-shaped Llama (random init; the shapes, not the values, set the cost)
with 50% masks on every decoder linear weight, as the train stage does it: `PruneTrainer` with the
masks, plus `DistillationLoss` against a parent of the same shape (distill) or `wrap_lora` restricted by
the masks (lora). Arms alternate over rounds, each round a fresh subprocess per arm, so machine load and
allocator state affect all alike; step time is the median over the steps after the first, memory is the
peak over the training (GPU: `max_memory_allocated`; CPU: resident memory sampled above what the process
held before it built the models).

Result: held-out perplexity each kind reached on the same token budget, read from a finished run's
metrics.json (default runs/smollm2_recovery, made by `hfprune run recipes/smollm2_recovery.yaml`).

    .venv/bin/python bench/bench_recovery.py [--layers 30] [--steps 6] [--rounds 2] [--run runs/smollm2_recovery] [--write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results import PeakRSS, machine, replace_section
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from hfprune.trainer import PruneTrainer


ARMS = ("plain", "distill", "lora")
SECTION = "Recovery: distillation and LoRA vs plain training"


def smollm2_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def child(arm: str, layers: int, steps: int, batch: int, seq_len: int) -> dict[str, float]:
    """One arm in this (fresh) process: median step seconds and peak training memory in bytes."""
    from hfprune.training.recovery.distill import DistillationLoss
    from hfprune.training.recovery.lora import wrap_lora
    from hfprune.training.recovery.specs import DistillSpec, LoraSpec

    cuda = torch.cuda.is_available()
    before = torch.cuda.memory_allocated() if cuda else PeakRSS.current()
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(layers))
    masks = {
        name: torch.rand_like(p) >= 0.5
        for name, p in model.named_parameters()
        if p.dim() == 2 and "layers." in name
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    loss = None
    if arm == "distill":
        loss = DistillationLoss(LlamaForCausalLM(smollm2_config(layers)), DistillSpec())
    if arm == "lora":
        model = wrap_lora(model, LoraSpec(), masks=masks)
    data = [
        {"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 49152, (steps * batch, seq_len))
    ]
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, report_to=[],
            save_strategy="no", logging_strategy="no", use_cpu=not cuda, disable_tqdm=True,
        )  # fmt: skip
        trainer = PruneTrainer(
            model=model, args=args, train_dataset=data, masks=masks, train_loss=loss, callbacks=[clock]
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            trainer.train()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with PeakRSS() as rss:
                trainer.train()
            peak = rss.peak - before
    return {"step_s": statistics.median(clock.times[1:]), "peak_bytes": peak}


def perplexities(run: Path) -> tuple[str, dict[str, float], int | None]:
    """(first perplexity set, {kind: value}, tokens trained) of a finished run."""
    metrics = json.loads((run / "metrics.json").read_text())
    first = next(iter(metrics["continued"]["perplexity"]))
    values = {
        k: v["perplexity"][first]["value"] for k, v in metrics.items() if first in v.get("perplexity", {})
    }
    return first, values, metrics["continued"].get("tokens_trained")


def table(results: dict[str, list[dict[str, float]]], run: Path) -> list[str]:
    step = {arm: statistics.median(r["step_s"] for r in results[arm]) for arm in ARMS}
    peak = {arm: max(r["peak_bytes"] for r in results[arm]) for arm in ARMS}
    metric, ppl, tokens = perplexities(run) if (run / "metrics.json").is_file() else ("-", {}, None)
    kind = {"plain": "continued", "distill": "distilled", "lora": "lora"}
    lines = [
        (
            f"| recovery | step time (s) | x plain | peak training memory (MiB) | x plain | "
            f"held-out perplexity ({metric}, {tokens or '-'} tokens) |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        value = ppl.get(kind[arm])
        lines.append(
            f"| {arm} ({kind[arm]}) | {step[arm]:.3f} | {step[arm] / step['plain']:.2f} | {peak[arm] / 2**20:.0f} | "
            f"{peak[arm] / peak['plain']:.2f} | {'-' if value is None else f'{value:.2f}'} |"
        )
    others = {k: v for k, v in ppl.items() if k not in kind.values()}
    if others:
        lines.append("")
        lines.append("Same run, for reference: " + ", ".join(f"{k} {v:.2f}" for k, v in others.items()) + ".")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--run", type=Path, default=Path("runs/smollm2_recovery"))
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--child", choices=ARMS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.steps, args.batch, args.seq_len)))
        return
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for _ in range(args.rounds):
        for arm in ARMS:
            argv = [sys.executable, __file__, "--child", arm, "--layers", str(args.layers), "--steps",
                    str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]  # fmt: skip
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            results[arm].append(json.loads(out.strip().splitlines()[-1]))
    command = " ".join(["bench/bench_recovery.py", *sys.argv[1:]]).replace(" --write", "")
    text = [
        f"Machine: {machine()}. Command: `.venv/bin/python {command}`.",
        (
            f"Cost: SmolLM2-135M-shaped Llama ({args.layers} layers, random init, 50% masks), {args.steps} steps of "
            f"{args.batch} x {args.seq_len} tokens per arm, {args.rounds} alternating rounds (a fresh process per arm "
            "and round); median step time after the first step, peak memory of training above the process's "
            "memory before building the models (distill includes the teacher). Perplexity: the run's metrics.json."
        ),
        "",
        *table(results, args.run),
    ]
    print("\n".join(text))
    if args.write:
        replace_section(SECTION, "\n".join(text))


if __name__ == "__main__":
    main()
