"""The pico-study's learning-rate sweep: the parent's shape trained on P tokens at several peak learning
rates, two seeds each, to pick the rate where dense training is stable and near its best loss.

Each run is the pico-study's own parent (recipes/pico_study.yaml: its config, tokenizer, data, schedule
and batch), pretrained by hfprune's pretrain stage with `parent.pretrain.args.learning_rate` and `seed`
overridden, then scored on the study's held-out set (the parent's evaluation stage). Runs are ordinary
hfprune runs under runs/lr_sweep/, so a stopped sweep resumes where it stopped.

    python bench/lr_sweep.py                      # all runs (at once, one thread each), then the table
    python bench/lr_sweep.py --table              # the table of finished runs only

It writes the table into bench/RESULTS.md (section "pico-study learning-rate sweep").
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pico_study.yaml"
OUT = ROOT / "runs" / "lr_sweep"
RATES = (5e-4, 1e-3, 3e-3)
SEEDS = (0, 1)
SECTION = "## pico-study learning-rate sweep"
# The rule the study's rate is chosen by, fixed before its comparison runs: the largest rate whose two
# seeds land within this many nats of each other (dense training stable under the seed), which on this
# grid is also within reach of the best mean loss.
STABLE_SPREAD = 0.1


def run_recipe(rate: float, seed: int) -> Path:
    """The single-run recipe of one (rate, seed): the study's parent; `hfprune prune` pretrains it and
    stops after one quick prune (the training section is never run)."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw.pop("sweep")
    name = f"lr{rate:g}-s{seed}"
    raw.update(name=f"pico_lr_{name}", seed=seed, output_dir=str(OUT / name))
    raw["parent"]["model"] = str(OUT / name / "models" / "parent")
    raw["parent"]["pretrain"]["args"]["learning_rate"] = rate
    raw["prune"] = {"method": "shortgpt", "ratio": 0.5}
    raw["train"]["token_budget"] = raw["parent"]["pretrain"]["token_budget"]  # required; never trained here
    path = OUT / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_one(rate: float, seed: int) -> None:
    path = run_recipe(rate, seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the runs share the cores
    log = path.with_suffix(".log")
    with log.open("a") as out:
        subprocess.run(
            [sys.executable, "-m", "hfprune", "prune", str(path)], env=env, stdout=out, stderr=out, check=True
        )


def losses(log: Path) -> list[tuple[int, float]]:
    """(tokens seen, training loss) of the pretraining run, from the Trainer's log lines in its log file."""
    points = []
    for line in log.read_text().replace("\r", "\n").splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            entry = ast.literal_eval(line[start : line.index("}", start) + 1])
            points.append((int(entry["num_input_tokens_seen"]), float(entry["loss"])))
    return points


def parent_perplexity(name: str) -> float:
    """The parent's held-out perplexity on the study's evaluation set, scored as the evaluate stage does
    (`hfprune.eval.perplexity.perplexity_scores`); cached in the run folder."""
    cached = OUT / name / "parent_eval.json"
    if not cached.is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hfprune.eval.perplexity import perplexity_scores
        from hfprune.recipe.schema import load_recipe

        recipe = load_recipe(OUT / f"{name}.yaml")
        folder = OUT / name / "models" / "parent"
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        scores = perplexity_scores(model, AutoTokenizer.from_pretrained(folder), recipe.eval)
        cached.write_text(json.dumps(scores, indent=2))
    return json.loads(cached.read_text())["stdlib_heldout"]["value"]


def late_jump(points: list[tuple[int, float]]) -> float:
    """The largest rise of the logged loss over its running minimum in the second half of training."""
    half = points[len(points) // 2 :]
    if not half:
        return math.nan
    low, worst = half[0][1], 0.0
    for _, loss in half:
        low = min(low, loss)
        worst = max(worst, loss - low)
    return worst


def row_done(rate: float, seed: int) -> bool:
    return (OUT / f"lr{rate:g}-s{seed}" / "models" / "parent" / "model.safetensors").is_file()


def row(rate: float) -> dict | None:
    ppl, jumps = [], []
    for seed in SEEDS:
        name = f"lr{rate:g}-s{seed}"
        if not (OUT / name / "models" / "parent" / "model.safetensors").is_file():
            return None
        ppl.append(parent_perplexity(name))
        jumps.append(late_jump(losses(OUT / f"{name}.log")))
    nll = [math.log(p) for p in ppl]
    return {
        "rate": rate,
        "ppl": ppl,
        "mean_nll": statistics.fmean(nll),
        "spread": max(nll) - min(nll),
        "late_jump": max(jumps),
    }


def table() -> str:
    rows = [r for r in (row(rate) for rate in RATES) if r]
    lines = [
        SECTION,
        "",
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
            "command: `python bench/lr_sweep.py` (runs/lr_sweep/, every run at once, one thread each)."
        ),
        (
            "The pico-study's parent shape (10 layers, hidden 64, vocabulary 2,048) pretrained on P = 1,048,576 "
            "tokens, 1,024 tokens per step, the study's warmup-stable-decay schedule; held-out perplexity on the "
            "study's evaluation set (256 windows spread over the test split). Spread: the difference of the two "
            "seeds' mean held-out NLL (nats). Late jump: the largest rise of the logged training loss above its "
            "running minimum in the second half of training (nats)."
        ),
        "",
        "| peak learning rate | held-out ppl, seed 0 | seed 1 | mean NLL | seed spread (nats) | late jump |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rate']:g} | {r['ppl'][0]:.2f} | {r['ppl'][1]:.2f} | {r['mean_nll']:.3f} | "
            f"{r['spread']:.3f} | {r['late_jump']:.3f} |"
        )
    stable = [r for r in rows if r["spread"] <= STABLE_SPREAD]
    if stable:
        chosen, best = max(stable, key=lambda r: r["rate"]), min(r["mean_nll"] for r in rows)
        lines += [
            "",
            (
                f"Chosen (the largest rate whose seed spread is at most {STABLE_SPREAD} nats): {chosen['rate']:g}, "
                f"{chosen['mean_nll'] - best:.3f} nats above the best mean NLL of the sweep."
            ),
        ]
    return "\n".join(lines) + "\n"


def write_results(text: str) -> None:
    results = ROOT / "bench" / "RESULTS.md"
    body = results.read_text()
    if SECTION in body:
        head, _, rest = body.partition(SECTION)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        body = head + text + ("\n" + tail if tail else "")
    else:
        body = body.rstrip() + "\n\n" + text
    results.write_text(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only print and write the table")
    args = parser.parse_args()
    if not args.table:
        # Unfinished runs first (a resumed sweep starts with the work left).
        jobs = sorted(((r, s) for s in SEEDS for r in RATES), key=lambda j: row_done(*j))
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # one thread each, all at once
            list(pool.map(lambda job: run_one(*job), jobs))
    text = table()
    print(text)
    write_results(text)


if __name__ == "__main__":
    main()
