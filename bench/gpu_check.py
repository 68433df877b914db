"""GPU check: the six pruners and a masked training run on a randomly initialised Llama-3.1-8B, offline.

Builds a model of Llama-3.1-8B's exact shape from tests/data/llama-3.1-8b-config (config only, random
weights, bfloat16, built on the device: nothing is downloaded), then

1. prunes it at ratio 0.5 with each of the six pruners, with the options of its shipped recipe and that
   recipe's calibration scaled down (fewer windows, then shorter ones) until the plan (`hfprune.plan.estimate`)
   estimates it fits the time budget (`--minutes`, shared by the six); records wall time, peak device
   memory (torch.cuda.max_memory_allocated), peak host memory (resident set, sampled), and the plan's
   estimates beside them;
2. trains the wanda-pruned model for `--steps` steps with `PruneTrainer` and its masks (fp32 master
   weights, bf16 autocast, gradient checkpointing, random tokens): tokens/s and MFU (model FLOPs =
   3 x forward, recomputation not counted, over the device's dense bf16 peak). When the whole model
   with AdamW does not fit one device, the plan picks the most leading decoder layers that do;
3. runs `make test-gpu`;

and writes the tables to bench/RESULTS.md under `## GPU check`. `--small` runs the same path on the CPU
with a small shape in float32 (a minute or two; section `## GPU check, small shape on the CPU`), so that
only the hardware is untested.

    make gpu-check                                   # on a CUDA machine
    .venv/bin/python bench/gpu_check.py --small      # anywhere
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from gpu_train import train_check
from results import PeakRSS, machine, replace_section
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from hfprune.plan.estimate import estimate
from hfprune.plan.hardware import GIB, Hardware, detect_hardware
from hfprune.pruners import get_pruner
from hfprune.recipe.schema import load_recipe


ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = ROOT / "tests/data/llama-3.1-8b-config"
RECIPES = {
    "shortgpt": "depth_0.5.yaml",
    "minitron_depth": "minitron_depth_0.5.yaml",
    "minitron_width": "minitron_width_0.5.yaml",
    "flap": "flap_0.5.yaml",
    "wanda": "wanda_0.5.yaml",
    "sparsegpt": "sparsegpt_0.5.yaml",
}
# Llama-3.1-8B's proportions at a CPU-sized width: 4 query heads per KV head, FFN 3.5 x hidden.
SMALL = {
    "hidden_size": 384,
    "intermediate_size": 1344,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
SMALL_MAX_SEQ_LEN = 256
logger = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Setup:
    config: Any
    device: torch.device
    dtype: torch.dtype
    hardware: Hardware
    small: bool

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def build(self, seed: int = 0) -> LlamaForCausalLM:
        """The random parent, built directly on the device in the check's dtype (same seed: same weights)."""
        torch.manual_seed(seed)
        with torch.device(self.device):  # a copy of the config: pruning in place changes the model's
            return LlamaForCausalLM._from_config(copy.deepcopy(self.config), dtype=self.dtype).eval()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_setup(small: bool) -> Setup:
    cuda = torch.cuda.is_available() and not small
    config = LlamaConfig(**SMALL) if small else AutoConfig.from_pretrained(LLAMA_8B)
    dtype = torch.bfloat16 if cuda else torch.float32  # CPUs without bf16 units are ~50x slower in bf16
    return Setup(config, torch.device("cuda" if cuda else "cpu"), dtype, detect_hardware(), small)


def plan_prune(setup: Setup, method: str, recipe: Any, n: int, s: int) -> Any:
    calibration = SimpleNamespace(num_samples=n, seq_len=s, batch_size=recipe.calibration.batch_size)
    plan = estimate(
        setup.config,
        method=method,
        ratio=0.5,
        options=recipe.prune.options,
        dtype=setup.dtype_name,
        calibration=calibration,
        eval_sets=[],
        hardware=setup.hardware,
    )
    return plan.stage("prune")


def scaled_calibration(setup: Setup, method: str, recipe: Any, seconds: float) -> tuple[int, int, str]:
    """The recipe's N x S, with fewer windows (then shorter ones) until the plan's estimate fits `seconds`."""
    n, s = recipe.calibration.num_samples, recipe.calibration.seq_len
    full = plan_prune(setup, method, recipe, n, s).seconds
    if setup.small:
        s = min(s, SMALL_MAX_SEQ_LEN)
    while s > 16 and plan_prune(setup, method, recipe, 1, s).seconds > seconds:
        s //= 2
    per_window = plan_prune(setup, method, recipe, 1, s).seconds
    n = max(1, min(n, int(seconds / per_window))) if per_window > 0 else n
    scale = f"{n} x {s} of {recipe.calibration.num_samples} x {recipe.calibration.seq_len}"
    return n, s, f"{scale} (plan at full size: {_duration(full)})"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def measure_pruner(setup: Setup, method: str, seconds: float) -> tuple[dict[str, Any], Any]:
    recipe = load_recipe(ROOT / "recipes" / RECIPES[method])
    n, s, note = scaled_calibration(setup, method, recipe, seconds)
    estimate_ = plan_prune(setup, method, recipe, n, s)
    model = setup.build()
    ids = torch.randint(0, setup.config.vocab_size, (n, s))
    pruner_cls = get_pruner(method)
    pruner = pruner_cls(pruner_cls.Options(**recipe.prune.options))
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup.sync()
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = pruner.prune(model, ids, 0.5, recipe.calibration.batch_size)
        setup.sync()
        elapsed = time.perf_counter() - start
    device_peak = torch.cuda.max_memory_allocated() if setup.device.type == "cuda" else None
    row = {
        "method": method,
        "recipe": RECIPES[method],
        "calibration": note,
        "seconds": elapsed,
        "plan_seconds": estimate_.seconds,
        "device_peak": device_peak,
        "plan_device": estimate_.total("device"),
        "host_peak": rss.peak,
        "plan_host": estimate_.total("host"),
        "shape": ", ".join(f"{k}={v}" for k, v in result.shape.config_changes.items())
        or f"sparsity {result.shape.ratio_achieved:.3f} of non-embedding parameters",
    }
    logger.info("%s: %s", method, row)
    return row, result


def run_gpu_tests(setup: Setup, force: bool) -> str:
    if setup.device.type != "cuda" and not force:
        return "not run: no CUDA device (these tests fail without one by design; --run-tests forces them)"
    done = subprocess.run(
        ["make", "test-gpu"], cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False
    )
    lines = [
        line for line in done.stdout.splitlines() if "passed" in line or "failed" in line or "error" in line
    ]
    return f"exit {done.returncode}: {lines[-1].strip('= ') if lines else done.stderr.strip()[-300:]}"


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def prune_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        (
            "| method | recipe | calibration used (N x S of the recipe's) | prune s | plan s | peak device GiB | "
            "plan device GiB | peak host GiB | plan host GiB | result |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['recipe']} | {r['calibration']} | {r['seconds']:.1f} | {r['plan_seconds']:.1f} | "
            f"{gib(r['device_peak'])} | {gib(r['plan_device'])} | {gib(r['host_peak'])} | {gib(r['plan_host'])} | "
            f"{r['shape']} |"
        )
    return lines


def write_results(setup: Setup, args: argparse.Namespace, rows: list, train: dict, tests: str) -> str:
    shape = "Llama-3.1-8B (tests/data/llama-3.1-8b-config)" if not setup.small else f"small Llama {SMALL}"
    command = "make gpu-check" if not setup.small else "python bench/gpu_check.py --small"
    body = [
        f"Machine: {machine()}.  ",
        f"Command: `{command}` ({datetime.date.today()}); whole script {args.elapsed / 60:.1f} min.  ",
        f"Parent: randomly initialised {shape}, {setup.dtype_name}, built on {setup.device} (no download).  ",
        f"Calibration: each recipe's, scaled by the plan to about {args.minutes * 60 / len(RECIPES):.0f} s "
        "per pruner (fewer windows first, then shorter windows"
        + (f"; --small caps windows at {SMALL_MAX_SEQ_LEN} tokens" if setup.small else "")
        + "); random token ids. Plan columns are "
        f"`hfprune.plan.estimate` estimates for the scaled calibration on this machine ({setup.hardware.source}).",
        "",
        *prune_table(rows),
        "",
        (
            f"Training ({train['what']}): {train['steps']} steps of {train['batch']} x {train['seq_len']} tokens, "
            f"{train['tokens_per_s']:.0f} tokens/s, MFU {train['mfu']:.1%} of {train['peak'] / 1e12:.3g} TFLOP/s "
            f"({train['dtype']}), peak device {gib(train['device_peak'])} GiB (plan {gib(train['plan_device'])}), "
            f"peak host {gib(train['host_peak'])} GiB (plan {gib(train['plan_host'])}); masked weights still zero: "
            f"{train['masks_kept']}."
        ),
        "",
        f"`make test-gpu`: {tests}",
    ]
    if setup.small:
        body += [
            "",
            (
                "The CPU path of `make gpu-check`: the same code on a small shape, so that only the hardware is "
                "untested. CPU times and the MFU (against a matmul throughput measured at the start) move with the "
                "load of a shared machine; the GPU numbers go under `## GPU check`."
            ),
        ]
    heading = "GPU check" if not setup.small else "GPU check, small shape on the CPU"
    if not args.no_write:
        replace_section(heading, "\n".join(body))
    return "\n".join(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small shape on the CPU, in float32")
    parser.add_argument(
        "--minutes", type=float, default=None, help="time budget of the six pruners (5; --small 0.5)"
    )
    parser.add_argument("--steps", type=int, default=50, help="training steps (at least 2)")
    parser.add_argument("--run-tests", action="store_true", help="run make test-gpu even without CUDA")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    args.minutes = args.minutes or (0.5 if args.small else 5.0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    begin = time.perf_counter()
    setup = make_setup(args.small)
    if not args.small and setup.device.type != "cuda":
        sys.exit("no CUDA device: run with --small for the CPU path")
    rows, sparse = [], None
    for method in RECIPES:
        row, result = measure_pruner(setup, method, args.minutes * 60 / len(RECIPES))
        rows.append(row)
        sparse = result if method == "wanda" else sparse
        del result
    train = train_check(setup, sparse, args.steps)
    del sparse
    tests = run_gpu_tests(setup, args.run_tests)
    args.elapsed = time.perf_counter() - begin
    print(write_results(setup, args, rows, train, tests))


if __name__ == "__main__":
    main()
