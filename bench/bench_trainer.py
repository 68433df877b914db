"""Overhead of PruneTrainer with TokenBudgetCallback and SparsityMaskCallback over a plain Trainer.

Both trainers train the same model (a SmolLM2-135M-shaped Llama cut to a few layers, random init) on
the same packed data with 50% masks on every decoder linear weight; arms alternate over several rounds
and the median step time of each is compared, so machine load affects both alike.

    .venv/bin/python bench/bench_trainer.py [--layers 4] [--steps 30] [--rounds 3]

Prints a Markdown row and, with --write, replaces the "Trainer overhead" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from results import machine, replace_section
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hfprune.callbacks import SparsityMaskCallback, TokenBudgetCallback
from hfprune.trainer import PruneTrainer


class CallbackClock:
    """Wall time spent inside hfprune's additions (the two callbacks' hooks and PruneTrainer's gradient
    masking), measured directly: a precise overhead figure that machine load cannot swamp."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0  # on_pre_optimizer_step may call zero_masked_grads: count the outer call only

    def wrap(self, owner: object, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)

    def instrument(self, trainer: PruneTrainer) -> None:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, SparsityMaskCallback | TokenBudgetCallback):
                for name in dir(callback):
                    if name.startswith("on_") or name in {"zero_masked_grads", "apply_to_weights"}:
                        self.wrap(callback, name)


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def build(layers: int) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    masks = {}
    for name, param in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            masks[name] = torch.rand(param.shape) >= 0.5
            param.data.mul_(masks[name])
    return model, masks


def dataset(blocks: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (blocks, seq_len), generator=generator)
    return [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]


def median_step(arm: str, layers: int, steps: int, batch: int, seq_len: int) -> tuple[float, float]:
    """Median step time of one arm, and the mean time per step spent in hfprune's additions."""
    model, masks = build(layers)
    timer, clock = StepTimer(), CallbackClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4, weight_decay=0.1,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=steps,
            include_num_input_tokens_seen="non_padding",
        )  # fmt: skip
        data = dataset(steps * batch, seq_len)
        if arm == "plain":
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        else:
            budget = steps * batch * seq_len
            trainer = PruneTrainer(
                model=model,
                args=args,
                train_dataset=data,
                callbacks=[timer],
                token_budget=budget,
                masks=masks,
            )
            clock.instrument(trainer)
        trainer.train()
    # The first steps include allocator warm-up.
    return statistics.median(timer.times[2:]), clock.seconds / max(len(timer.times), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    opts = parser.parse_args()
    times: dict[str, list[float]] = {"plain": [], "prune": []}
    in_callbacks: list[float] = []
    for _ in range(opts.rounds):
        for arm, samples in times.items():
            step, added = median_step(arm, opts.layers, opts.steps, opts.batch, opts.seq_len)
            samples.append(step)
            if arm == "prune":
                in_callbacks.append(added)
    plain, prune = statistics.median(times["plain"]), statistics.median(times["prune"])
    overhead = prune / plain - 1
    added = statistics.median(in_callbacks)
    command = (
        f"python bench/bench_trainer.py --layers {opts.layers} --steps {opts.steps} --rounds {opts.rounds} "
        f"--batch {opts.batch} --seq-len {opts.seq_len}"
    )
    table = "\n".join(
        [
            (
                "| model | batch x seq | plain Trainer s/step | PruneTrainer + both callbacks s/step | "
                "step-time difference | time in hfprune's additions per step | overhead (additions / plain step) |"
            ),
            "|---|---|---:|---:|---:|---:|---:|",
            (
                f"| SmolLM2-135M shape, {opts.layers} layers, 50% masks | {opts.batch} x {opts.seq_len} | "
                f"{plain:.4f} | {prune:.4f} | {overhead:+.1%} | {added * 1e3:.1f} ms | {added / plain:.2%} |"
            ),
        ]
    )
    section = (
        f"{table}\n\nMedian of {opts.rounds} alternating rounds of {opts.steps} steps. The step-time difference "
        "compares two whole runs and moves by several percent with machine load either way; the last column "
        "times the callbacks' hooks and PruneTrainer's gradient masking directly, against the plain step. "
        f"{machine()}. `{command}`\n"
    )
    print(section)
    if opts.write:
        replace_section("Trainer overhead", section)


if __name__ == "__main__":
    main()
