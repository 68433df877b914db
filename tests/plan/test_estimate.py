"""The plan: Llama-3.1-8B numbers checked by hand, knobs named when a stage does not fit, and the memory
formulas checked against measurements on tiny-but-wide models (the term under test dominates).

Measurements run in a subprocess (this file run as a script) with glibc's mmap threshold fixed at
128 KiB: at real scale every activation tensor (one 8192-token window of an 8B model is 64 MiB) is
above glibc's largest dynamic threshold (32 MiB), so it is mapped and unmapped on its own; without the
fixed threshold, small test tensors land in the heap and its fragmentation, not the formula, is measured.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from hfprune.errors import InvalidInput
from hfprune.plan.estimate import PlanError, estimate, format_plan, plan_recipe, problems
from hfprune.plan.hardware import GIB, Hardware
from hfprune.recipe.schema import load_recipe


ROOT = Path(__file__).resolve().parents[2]
LLAMA_8B = ROOT / "tests/data/llama-3.1-8b-config"
H100 = Hardware("H100 (test)", 1, 80 * 10**9, None, {"bfloat16": 989e12, "float32": 67e12}, "test")
CPU = Hardware("CPU (test)", 1, None, None, {"bfloat16": 1e9, "float32": 1e10}, "test")

# Tiny-but-wide models, one per measured term.
CALIBRATION = {"hidden_size": 1024, "intermediate_size": 64, "num_attention_heads": 2, "head_dim": 32}
CALIBRATION_SET = {"num_samples": 32, "seq_len": 256, "batch_size": 4}
CALIBRATION_BATCH = 8
EVALUATION = {"vocab_size": 8192, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
EVALUATION_SET = {"batch_size": 4, "seq_len": 256}
TRAINING = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4}
TRAINING_BATCH = {"batch_size": 4, "seq_len": 128}


def config(**values) -> LlamaConfig:
    base = {
        "vocab_size": 384,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
    }
    return LlamaConfig(**{**base, **values})


# -- Llama-3.1-8B, by hand -------------------------------------------------------------------------
# Parameters: embedding and untied head 2 x 128256 x 4096 = 1,050,673,152; one layer: attention
# 4096 x (4096 + 2 x 1024) + 4096 x 4096 = 41,943,040, MLP 3 x 4096 x 14336 = 176,160,768, norms 8,192:
# 218,112,000; x 32 layers + final norm 4,096 = 6,979,588,096; total 8,030,261,248.
P_8B = 8_030_261_248
# Forward FLOPs per token at S = 8192: 2 x (6,979,588,096 + 128256 x 4096) + 2 x 32 x 8192 x 4096.
FORWARD_8B = 2 * (6_979_588_096 + 525_336_576) + 2_147_483_648
assert FORWARD_8B == 17_157_332_992


@pytest.fixture(scope="module")
def depth_plan():
    recipe = load_recipe(ROOT / "recipes/depth_0.5.yaml")
    return plan_recipe(recipe, AutoConfig.from_pretrained(LLAMA_8B), H100)


def test_llama_8b_evaluation_by_hand(depth_plan):
    stage = depth_plan.stage("parent_eval")
    weights = P_8B * 2  # bf16
    logits = 1 * 8192 * 128256 * (2 + 4 + 4 + 4)  # bf16 logits, fp32 copy, shifted copy, log-softmax
    assert stage.total("device") == weights + logits == 30_769_946_624  # 28.66 GiB
    # Two sets (wikitext2, c4) of 256 windows x 8192 tokens, at 40% of 989 TFLOP/s: about 3 minutes.
    assert stage.flops == 2 * 256 * 8192 * FORWARD_8B
    assert stage.seconds == pytest.approx(2 * 256 * 8192 * FORWARD_8B / (0.4 * 989e12))
    assert round(stage.seconds) == 182 and stage.time_class == "minutes"


def test_llama_8b_streamed_calibration_by_hand(depth_plan):
    stage = depth_plan.stage("prune")  # shortgpt: one streamed forward per batch of 1 window
    assert stage.total("host") == GIB + 1024 * 8192 * 8  # baseline and the token ids only
    batch_forward = 1 * 8192 * (4 * 4096 + 3 * 14336) * 2
    cosine = (2 + 2) * 8192 * 4096 * 4  # fp32 copies of a layer's input and output, two products
    assert stage.total("device") == P_8B * 2 + batch_forward + cosine
    # One decoder forward (no LM head) over 8,388,608 tokens: about 6 minutes.
    decoder = 2 * 6_979_588_096 + 2_147_483_648
    assert stage.flops == 1024 * 8192 * decoder
    assert stage.time_class == "minutes"
    pruned = depth_plan.stage("pruned_eval")
    assert pruned.terms("device")[0].bytes == (P_8B - 16 * 218_112_000) * 2  # 16 of 32 layers kept


def test_llama_8b_sequential_calibration_by_hand():
    plan = plan_recipe(
        load_recipe(ROOT / "recipes/wanda_0.5.yaml"), AutoConfig.from_pretrained(LLAMA_8B), H100
    )
    stage = plan.stage("prune")
    terms = {t.name: t.bytes for t in stage.terms("device")}
    # 128 windows x 8192 tokens x 4096 x 2 B = 8 GiB of hidden states; the default budget holds 4 GiB.
    assert terms["calibration activations"] == 4 * GIB
    disk = {t.name: t.bytes for t in stage.disk}
    assert disk["spilled activations"] == 4 * GIB  # under $TMPDIR
    assert disk["pruned model"] == P_8B * 2  # the masked weights in bfloat16, beside the masks
    decoder = 2 * 6_979_588_096 + 2_147_483_648
    assert stage.flops == 2 * 128 * 8192 * decoder  # statistics pass, then the pruned layer's outputs


def test_llama_8b_minitron_depth_reuses_the_prefix_by_hand():
    recipe = load_recipe(ROOT / "recipes/minitron_depth_0.5.yaml")
    stage = plan_recipe(recipe, AutoConfig.from_pretrained(LLAMA_8B), H100).stage("prune")
    decoder = 2 * 6_979_588_096 + 2_147_483_648
    layer = 2 * 218_112_000 + 2 * 8192 * 4096
    head = 2 * 128256 * 4096
    # 17 candidate blocks of 16 layers: the one at start s runs the 16 - s layers after it, 136 in all;
    # 17 candidates and the parent read the LM head.
    per_token = decoder + 136 * layer + 18 * head
    assert stage.flops == 1024 * 8192 * per_token
    assert round(stage.seconds / 60) == 37  # 8.68e17 FLOP at 40% of 989 TFLOP/s


def test_llama_8b_training_by_hand():
    recipe = load_recipe(ROOT / "recipes/depth_0.5_train_fsdp.yaml")
    plan = plan_recipe(recipe, AutoConfig.from_pretrained(LLAMA_8B), H100.with_devices(8))
    stage = plan.stage("train_continued")
    p = P_8B - 16 * 218_112_000  # 4,540,469,248
    terms = {t.name: t.bytes for t in stage.terms("device")}
    assert terms["weights, gradients, AdamW moments"] == p * 16 // 8  # FSDP over 8 processes
    t = 2 * 8192  # micro-batch of 2 windows
    per_layer = 6 * 4096 + 3 * 4096 + 2 * 1024 + 4 * 14336
    assert terms["activations"] == t * 16 * 4096 * 2 + t * per_layer * 2  # gradient checkpointing, bf16
    assert terms["logits and loss"] == t * 128256 * 14
    # 4 x (checkpointing) 52.4B tokens x forward of the pruned model on 8 GPUs at 40%: about a week.
    forward = 2 * (p - 1_050_673_152 + 525_336_576) + 2 * 16 * 8192 * 4096
    assert stage.flops == 4 * 52_428_800_000 * forward
    assert stage.time_class == "days"
    assert {t.name: t.bytes for t in stage.terms("host")}["model loaded per process"] == 8 * p * 4
    # On one device nothing is sharded: 16 B per parameter alone (67.7 GiB) plus the rest exceed 73.5 GiB.
    alone = plan_recipe(recipe, AutoConfig.from_pretrained(LLAMA_8B), H100)
    found = problems(alone)
    assert [key for key, _ in found] == ["torchrun --nproc_per_node"] * 2  # continued and scratch
    assert found[0][1].startswith("train_continued needs 108.5 GiB of device memory, 73.5 GiB usable")


def test_a_stage_that_does_not_fit_names_the_knob_and_how_far_to_turn_it():
    config = AutoConfig.from_pretrained(LLAMA_8B)
    small_device = Hardware("d", 1, 24 * GIB, None, {"bfloat16": 1e14, "float32": 1e13}, "test")
    plan = plan_recipe(load_recipe(ROOT / "recipes/depth_0.5.yaml"), config, small_device)
    found = problems(plan)
    # Only the parent's evaluation (28.66 GiB) exceeds 23 GiB: 14.96 GiB of weights leave room for
    # logits of 8192 x (23 - 14.958) / 13.699 = 4809 tokens; eval.batch_size is already 1.
    assert [key for key, _ in found] == ["eval.perplexity.0.seq_len"]
    assert found[0][1].startswith("parent_eval needs 28.7 GiB") and "to at most 4809" in found[0][1]
    refusal = PlanError(found)  # what a run raises for them (hfprune.plan.check)
    assert isinstance(refusal, InvalidInput) and refusal.exit_code == 2
    assert "eval.perplexity.0.seq_len" in str(refusal)


def test_the_activation_budget_is_the_knob_of_the_sequential_walk():
    config = AutoConfig.from_pretrained(LLAMA_8B)
    recipe = load_recipe(ROOT / "recipes/wanda_0.5.yaml", ["prune.options.max_activation_bytes=21474836480"])
    device = Hardware("d", 1, 40 * GIB, None, {"bfloat16": 1e14, "float32": 1e13}, "test")
    found = dict(problems(plan_recipe(recipe, config, device)))
    # A 20 GiB budget holds all 8 GiB: 14.96 weights + 8 + 0.91 batch forward + 0.88 fp32 copies (the
    # down_proj input and its square) = 24.74 GiB, under 39 GiB usable. On a 20 GiB device (19 usable)
    # the held activations must shrink to 19 - 16.74 = 2.26 GiB (2,426,939,392 B).
    assert found == {}
    device = Hardware("d", 1, 20 * GIB, None, {"bfloat16": 1e14, "float32": 1e13}, "test")
    found = dict(problems(plan_recipe(recipe, config, device)))
    message = found["prune.options.max_activation_bytes"]
    assert message.startswith("prune needs 24.7 GiB of device memory, 19.0 GiB usable")
    weights, other = P_8B * 2, 8192 * (4 * 4096 + 3 * 14336) * 2 + 2 * 8192 * 14336 * 4
    assert f"from 8589934592 to at most {19 * GIB - weights - other}" in message


def test_format_and_json_show_every_stage_with_its_terms(depth_plan):
    text = format_plan(depth_plan)
    for needle in ("parent_eval", "prune", "pruned_eval", "batch forward", "40%", "8,030,261,248"):
        assert needle in text
    data = json.loads(json.dumps(depth_plan.to_dict()))
    assert list(data["stages"]) == ["parent_eval", "prune", "pruned_eval"]
    assert data["stages"]["prune"]["host_bytes"] == depth_plan.stage("prune").total("host")


def test_without_an_accelerator_everything_is_host_memory():
    stage = case_stage("sequential")
    assert stage.total("device") is None
    names = [t.name for t in stage.terms("host")]
    assert {"weights", "batch forward", "statistics copies", "calibration token ids"} <= set(names)


# -- measurements on tiny models ------------------------------------------------------------------
# Each case: (model config, method, calibration windows, prune options); the measured quantity is the
# rise of resident memory while the pruner runs, against the plan's terms that are not allocated yet.
CASES = {
    "stream_8": (CALIBRATION, "shortgpt", 8, {}),
    "stream_48": (CALIBRATION, "shortgpt", 48, {}),
    "sequential": (CALIBRATION, "wanda", 48, {}),
    "spilling": (CALIBRATION, "wanda", 48, {"max_activation_bytes": 8 * 2**20}),  # one batch of 8 held
}
NEW_IN_PRUNE = ("calibration activations", "batch forward", "statistics copies")


def case_stage(case: str):
    values, method, windows, options = CASES[case]
    calibration = SimpleNamespace(num_samples=windows, seq_len=256, batch_size=CALIBRATION_BATCH)
    return estimate(
        config(**values),
        method=method,
        ratio=0.5,
        options=options,
        calibration=calibration,
        eval_sets=[],
        hardware=CPU,
    ).stage("prune")


def stage_of(name: str):
    if name == "parent_eval":
        sets = [SimpleNamespace(name="x", seq_len=EVALUATION_SET["seq_len"], max_windows=8)]
        return estimate(
            config(**EVALUATION),
            method="shortgpt",
            ratio=0.5,
            calibration=SimpleNamespace(**CALIBRATION_SET),
            eval_sets=sets,
            eval_batch_size=EVALUATION_SET["batch_size"],
            hardware=CPU,
        ).stage(name)
    train = SimpleNamespace(
        runs=["continued"],
        token_budget=1000,
        seq_len=TRAINING_BATCH["seq_len"],
        args={"per_device_train_batch_size": TRAINING_BATCH["batch_size"]},
    )
    return estimate(
        config(**TRAINING),
        method="shortgpt",
        ratio=0.5,
        calibration=SimpleNamespace(**CALIBRATION_SET),
        eval_sets=[],
        train=train,
        hardware=CPU,
    ).stage(name)


def term_bytes(stage, *names) -> int:
    return sum(t.bytes for t in stage.terms("host") if t.name in names)


@pytest.fixture(scope="module")
def measured() -> dict[str, int]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_streamed_calibration_memory_is_one_batch_whatever_the_number_of_windows(measured):
    few, many = (term_bytes(case_stage(c), *NEW_IN_PRUNE) for c in ("stream_8", "stream_48"))
    assert few == many > 32 * 2**20
    assert measured["stream_8"] == pytest.approx(few, rel=0.25)
    assert measured["stream_48"] == pytest.approx(many, rel=0.25)


def test_sequential_calibration_memory_matches_the_estimate_within_its_budget(measured):
    held = case_stage("sequential")
    assert {t.name: t.bytes for t in held.terms("host")}["calibration activations"] == 48 * 256 * 1024 * 4
    assert measured["sequential"] == pytest.approx(term_bytes(held, *NEW_IN_PRUNE), rel=0.25)
    spilling = case_stage("spilling")
    assert {t.name: t.bytes for t in spilling.terms("host")}["calibration activations"] == 8 * 2**20
    assert [t.bytes for t in spilling.disk if t.name == "spilled activations"] == [40 * 2**20]
    assert measured["spilling"] == pytest.approx(term_bytes(spilling, *NEW_IN_PRUNE), rel=0.25)


def test_evaluation_memory_matches_the_estimate(measured):
    predicted = term_bytes(stage_of("parent_eval"), "logits and loss")
    assert predicted > 64 * 2**20
    assert measured["evaluation"] == pytest.approx(predicted, rel=0.25)


def test_training_memory_matches_the_estimate(measured):
    stage = stage_of("train_continued")
    # The fp32 weights exist before the measurement starts: 12 of the 16 bytes per parameter are new.
    states = term_bytes(stage, "weights, gradients, AdamW moments") * 12 // 16
    predicted = states + term_bytes(stage, "activations", "logits and loss")
    assert measured["training"] == pytest.approx(predicted, rel=0.25)


class _PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond in a thread."""

    def __enter__(self):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rise = max(self.peak, self._rss()) - self.base


def _measure() -> dict[str, int]:
    from transformers import LlamaForCausalLM

    from hfprune.eval.perplexity import perplexity
    from hfprune.pruners import get_pruner

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rises = {}
    # Unmeasured warm-up: the first forward pass allocates torch's one-time state (kernels, pools).
    get_pruner("shortgpt")().score(
        LlamaForCausalLM(config(**CALIBRATION)).eval(), torch.randint(0, 384, (8, 256)), 8
    )
    for case, (values, method, windows, options) in CASES.items():
        model = LlamaForCausalLM(config(**values)).eval()
        ids = torch.randint(0, 384, (windows, 256))
        pruner_cls = get_pruner(method)
        with _PeakRSS() as rss:
            pruner_cls(pruner_cls.Options(**options)).prune(model, ids, 0.5, batch_size=CALIBRATION_BATCH)
        rises[case] = rss.rise
    model = LlamaForCausalLM(config(**EVALUATION)).eval()
    ids = torch.randint(0, 8192, (EVALUATION_SET["batch_size"], EVALUATION_SET["seq_len"]))
    with _PeakRSS() as rss:
        perplexity(model, ids, True, {}, batch_size=EVALUATION_SET["batch_size"])
    rises["evaluation"] = rss.rise
    # The train stage trains the pruned model: shortgpt at 0.5 keeps 1 of the parent's 2 layers.
    model = LlamaForCausalLM(config(**TRAINING, num_hidden_layers=1)).train()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    ids = torch.randint(0, 384, (TRAINING_BATCH["batch_size"], TRAINING_BATCH["seq_len"]))
    with _PeakRSS() as rss:
        for _ in range(2):  # the second step is the steady state: AdamW's moments exist during forward
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    rises["training"] = rss.rise
    return rises


if __name__ == "__main__":
    print(json.dumps(_measure()))
