"""The callbacks under two real processes (torchrun, gloo, CPU): DDP through the Trainer, and raw FSDP2.

One torchrun launch runs every phase of tests/distributed_train_script.py (process start-up dominates);
each test below checks one phase from the per-rank reports.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).with_name("distributed_train_script.py")
REPO = Path(__file__).resolve().parents[1]
BATCH, ACCUMULATION, WORLD = 2, 2, 2


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.update({"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    # The timeout only guards against a hung collective; it is not a performance assertion.
    done = subprocess.run(
        [*command, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_ddp_token_budget_sums_every_process(reports):
    ddp = [report["ddp"] for report in reports]
    assert {r["wrapped"] for r in ddp} == {"DistributedDataParallel"}
    steps = ddp[0]["global_step"]
    # Per optimizer step: both processes' micro-batches.
    per_step = [
        sum(sum(r["local_tokens"][i * ACCUMULATION : (i + 1) * ACCUMULATION]) for r in ddp)
        for i in range(steps)
    ]
    cumulative = [sum(per_step[: i + 1]) for i in range(steps)]
    budget = 500
    assert all(len(r["local_tokens"]) == steps * ACCUMULATION for r in ddp)
    assert cumulative[-2] < budget <= cumulative[-1]
    for r in ddp:
        assert r["global_step"] == steps
        assert r["tokens_seen"] == r["tokens_logged"] == cumulative[-1]
        assert r["tokens_seen"] > sum(r["local_tokens"])  # not just this process's share
        assert r["masked_nonzeros"] == 0
    assert ddp[0]["weight_sum"] == ddp[1]["weight_sum"]  # replicas stayed in sync
    # PruneTrainer destroys the process group at exit; the clean return code above covers that exit.
    assert all(report["exit_hook"] for report in reports)


def test_packed_stream_is_dealt_disjointly_to_ranks_under_prune_trainer(reports):
    packed = [report["packed"] for report in reports]
    expected = packed[0]["expected_rows"]
    for r in packed:
        assert r["global_step"] == 3
        assert r["tokens_seen"] == 3 * r["tokens_per_step"] >= r["budget"]
        assert r["masked_nonzeros"] == 0
    # accelerate dispatches: per micro-batch, rank 0 gets the next BATCH blocks of the single stream,
    # rank 1 the BATCH after those.
    for rank, r in enumerate(packed):
        dealt = [
            expected[(WORLD * micro + rank) * BATCH : (WORLD * micro + rank + 1) * BATCH]
            for micro in range(len(r["rows"]) // BATCH)
        ]
        assert r["rows"] == [row for chunk in dealt for row in chunk]
    assert sorted(packed[0]["rows"] + packed[1]["rows"]) == sorted(expected)


def test_fsdp2_masks_apply_to_dtensor_shards(reports):
    fsdp = [report["fsdp2"] for report in reports]
    for r in fsdp:
        assert r["param_type"] == "DTensor"
        assert r["local_rows"] * WORLD == r["full_rows"]  # really sharded
        assert r["masked_nonzeros"] == 0
        assert r["masked_grad_nonzeros"] == 0
        assert r["survivors_changed"]
    assert fsdp[0]["escaped"] == {} and fsdp[0]["verify_error"] is None
    assert fsdp[1]["escaped"] == {"model.layers.1.mlp.up_proj.weight": 1}
    assert "module model.layers.1.mlp.up_proj (weight): 1" in fsdp[1]["verify_error"]
