"""GPU-only paths, checked on a CUDA machine with one command: `make test-gpu` (`pytest -m gpu`).

Trainer FSDP and bf16 cannot run on CPU (accelerate falls back to plain DDP there), so these tests are
deselected by default and fail, rather than skip, when run without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hfprune.recipe.schema import load_recipe


pytestmark = pytest.mark.gpu

TRAIN = """
train:
  token_budget: 4096
  seq_len: 64
  args:
    per_device_train_batch_size: 4
    bf16: true
    fsdp: true
    fsdp_config: {version: 2, transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}
"""


def test_fsdp_bf16_training_keeps_masks_and_budget(write_recipe):
    assert torch.cuda.is_available(), "run on a CUDA machine: make test-gpu"
    gpus = torch.cuda.device_count()
    path = write_recipe(TRAIN, method="magnitude")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={gpus}",
        "-m",
        "hfprune",
        "run",
    ]
    done = subprocess.run(
        [*command, str(path)], capture_output=True, text=True, env=dict(os.environ), timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = load_recipe(path).output_path
    pruned = load_file(out / "models/pruned/model.safetensors")
    for run in ("continued", "scratch"):
        report = json.loads((out / "models" / run / "training_report.json").read_text())
        assert 4096 <= report["tokens_trained"] < 4096 + report["tokens_per_step"]
        trained = load_file(out / "models" / run / "model.safetensors")
        for name, weight in pruned.items():
            if name.endswith("proj.weight"):
                zeros = weight == 0
                assert zeros.float().mean() > 0.45, name
                assert (trained[name][zeros] == 0).all(), f"{run}: a pruned weight of {name} was revived"
