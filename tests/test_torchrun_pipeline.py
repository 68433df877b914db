"""`torchrun --nproc_per_node=2 -m hfprune run RECIPE` (gloo on CPU): same global token count as one
process, only rank 0 writes, clean shutdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hfprune.pipeline import runner as pipeline
from hfprune.recipe.schema import load_recipe


TRAIN = """
train:
  token_budget: 1000
  seq_len: 32
  args: {per_device_train_batch_size: 2, gradient_accumulation_steps: 2}
"""


def test_two_processes_match_one(write_recipe):
    single = load_recipe(write_recipe(TRAIN, name="single"))
    pipeline.run(single)
    path = write_recipe(TRAIN, name="ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "hfprune",
        "run",
        str(path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("outputs in") == 1  # only the main process reports
    out = load_recipe(path).output_path
    for run in ("continued", "scratch"):
        report = json.loads((out / "models" / run / "training_report.json").read_text())
        reference = json.loads((single.output_path / "models" / run / "training_report.json").read_text())
        assert report["tokens_per_step"] == 2 * reference["tokens_per_step"]  # two processes per step
        assert 1000 <= report["tokens_trained"] < 1000 + report["tokens_per_step"]
        assert report["tokens_trained"] == reference["tokens_trained"] == 1024
    assert not list((out / "models").glob(".*"))  # no staging or temporary folders left behind
