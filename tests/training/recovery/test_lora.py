"""LoRA recovery (`hfprune.training.recovery.lora`): training through PruneTrainer, the merged plain checkpoint,
and sparse masks that hold through training and the merge."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from conftest import masked_nonzeros, tiny_llama
from pydantic import ValidationError
from torch.utils.data import Dataset
from transformers import LlamaForCausalLM, TrainerCallback, TrainingArguments

from hfprune.trainer import PruneTrainer
from hfprune.training.recovery.lora import LoraTargetError, MaskedLora, _MaskedLowRank, merge_lora, wrap_lora
from hfprune.training.recovery.specs import LoraSpec


VOCAB = 96
SEQ = 16
SPEC = LoraSpec(rank=4, alpha=8, dropout=0.0)


def sparse_llama(seed: int = 0) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    model = tiny_llama(seed, vocab=VOCAB)
    gen = torch.Generator().manual_seed(seed)
    masks = {
        name: torch.rand(p.shape, generator=gen) < 0.5
        for name, p in model.named_parameters()
        if ".layers." in name and p.ndim == 2
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.masked_fill_(~masks[name], 0)
    return model, masks


class Tokens(Dataset):
    """Counting sequences (each token is the previous one plus one): learnable in a few steps."""

    def __init__(self, size: int) -> None:
        gen = torch.Generator().manual_seed(0)
        starts = torch.randint(1, VOCAB, (size, 1), generator=gen)
        self.ids = (starts + torch.arange(SEQ)) % (VOCAB - 1) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(model, out, masks=None, steps: int = 6, callbacks=(), resume=None, save_steps=None) -> PruneTrainer:
    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        max_steps=steps,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        seed=0,
        learning_rate=1e-2,
        weight_decay=0.1,
    )
    trainer = PruneTrainer(
        model=model, args=args, train_dataset=Tokens(64), masks=masks, callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


INPUT = torch.arange(1, 13).reshape(2, 6)


def test_lora_trains_and_merges_into_a_plain_checkpoint_that_loads_without_peft(tmp_path):
    model = tiny_llama(vocab=VOCAB)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = wrap_lora(model, SPEC)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    trainer = train(peft_model, tmp_path / "run")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]

    merged = merge_lora(trainer.model)
    assert type(merged) is LlamaForCausalLM
    assert all(p.requires_grad for p in merged.parameters())
    state = merged.state_dict()
    assert set(state) == set(original)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.equal(state[name], original[name])  # the adapters moved the merged weights
    assert torch.equal(state["model.embed_tokens.weight"], original["model.embed_tokens.weight"])

    folder = tmp_path / "lora"
    merged.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    merged.eval()
    with torch.no_grad():
        expected = merged(INPUT).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["peft"] = None  # any import of peft now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
with torch.no_grad():
    logits = model(torch.arange(1, 13).reshape(2, 6)).logits
assert torch.allclose(logits, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-5)
print("ok", type(model).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok LlamaForCausalLM"


def test_sparse_zeros_survive_lora_training_and_the_merge(tmp_path):
    model, masks = sparse_llama()
    peft_model = wrap_lora(model, SPEC, masks=masks)
    trainer = train(peft_model, tmp_path / "run", masks=masks)
    trained = trainer.model.eval()
    assert masked_nonzeros(trained, masks) == 0
    lora_b = [p for n, p in trained.named_parameters() if ".lora_B." in n]
    assert all(torch.count_nonzero(p) > 0 for p in lora_b)  # adapters were trained, not masked
    with torch.no_grad():
        trained_logits = trained(INPUT).logits

    merged = merge_lora(trained, masks)
    assert masked_nonzeros(merged, masks) == 0
    for name, keep in masks.items():
        assert torch.count_nonzero(merged.get_parameter(name)[keep]) > 0.99 * keep.sum()
    # The adapters were restricted to the masks in training too: the merged model is the trained one.
    with torch.no_grad():
        torch.testing.assert_close(merged(INPUT).logits, trained_logits, rtol=1e-4, atol=1e-5)


def test_peft_merge_of_restricted_adapters_keeps_zeros_without_merge_lora():
    model, masks = sparse_llama()
    peft_model = wrap_lora(model, SPEC, masks=masks)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    merged = peft_model.merge_and_unload()  # peft's own merge, through the MaskedLora variant
    assert masked_nonzeros(merged, masks) == 0


def test_dense_adapters_are_masked_at_merge_with_a_warning(caplog):
    model, masks = sparse_llama()
    peft_model = wrap_lora(model, SPEC)  # no masks: the update is dense
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    with caplog.at_level(logging.WARNING, logger="hfprune.training.recovery.lora"):
        merged = merge_lora(peft_model, masks)
    assert masked_nonzeros(merged, masks) == 0
    assert "trained with a dense update" in caplog.text and "wrap_lora" in caplog.text


def test_masked_update_and_its_gradients_equal_a_dense_masked_product():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=gen, requires_grad=True)
    a = torch.randn(2, 7, generator=gen, requires_grad=True)
    b = torch.randn(6, 2, generator=gen, requires_grad=True)
    keep = torch.rand(6, 7, generator=gen) < 0.5
    got = _MaskedLowRank.apply(x, a, b, keep, 0.5)
    want = x @ (keep * (b @ a) * 0.5).T
    torch.testing.assert_close(got, want)
    upstream = torch.randn(got.shape, generator=gen)
    for g, w in zip(
        torch.autograd.grad(got, (x, a, b), upstream),
        torch.autograd.grad(want, (x, a, b), upstream),
        strict=True,
    ):
        torch.testing.assert_close(g, w)


def test_lora_resume_matches_an_uninterrupted_run(tmp_path):
    def run(name, **kwargs):
        model, masks = sparse_llama()
        return train(wrap_lora(model, SPEC, masks=masks), tmp_path / name, masks=masks, **kwargs)

    full = run("full")
    run("cut", save_steps=3, callbacks=[StopAt(3)])
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == SPEC.rank
    resumed = run("cut", resume=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 6
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert all(
        isinstance(v, MaskedLora)
        for m in resumed.model.modules()
        for v in getattr(m, "lora_variant", {}).values()
    )


def test_bad_targets_and_specs_get_clear_errors():
    with pytest.raises(LoraTargetError, match=r"'q_prj' \(did you mean 'q_proj'\?\).*linear modules are"):
        wrap_lora(tiny_llama(vocab=VOCAB), LoraSpec(target_modules=("q_prj", "v_proj")))
    assert LoraSpec().target_modules == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    with pytest.raises(ValidationError, match="at least one module"):
        LoraSpec(target_modules=())
    with pytest.raises(ValidationError, match="more than once"):
        LoraSpec(target_modules=("q_proj", "q_proj"))
    for bad in ({"rank": 0}, {"dropout": 1.0}, {"alpha": -1}, {"ranks": 4}):
        with pytest.raises(ValidationError):
            LoraSpec(**bad)
