"""SparsityMaskCallback with PEFT models, used the way another project would: peft's own LoRA, a plain
Trainer, the masks of the plain model."""

import logging
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from hfprune.callbacks import SparsityMaskCallback
from hfprune.callbacks.sparsity_mask import canonical_name


VOCAB = 96
SEQ = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sparse_peft_llama() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=32, pad_token_id=0)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    masks = {
        name: torch.rand(p.shape, generator=gen) < 0.5
        for name, p in model.named_parameters()
        if ".layers." in name and p.ndim == 2
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.masked_fill_(~masks[name], 0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)), masks


class Tokens(Dataset):
    def __init__(self, size: int) -> None:
        starts = torch.randint(1, VOCAB, (size, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(SEQ)) % (VOCAB - 1) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index].clone()}


def test_peft_names_map_to_the_plain_names():
    plain = "model.layers.0.self_attn.q_proj.weight"
    assert canonical_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == plain
    assert (
        canonical_name("module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == plain
    )
    assert canonical_name(plain) == plain
    assert canonical_name("model.base_model.x.weight") == "model.base_model.x.weight"  # only a leading prefix


def test_plain_masks_train_a_peft_model_whose_adapters_learn(tmp_path):
    peft_model, masks = sparse_peft_llama()
    callback = SparsityMaskCallback(masks)  # plain names, as the pruned model had them
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        max_steps=4,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    Trainer(model=peft_model, args=args, train_dataset=Tokens(32), callbacks=[callback]).train()
    assert callback.count_escaped(peft_model) == {}
    lora_b = {n: p for n, p in peft_model.named_parameters() if ".lora_B." in n}
    assert len(lora_b) == 14 and all(torch.count_nonzero(p) > 0 for p in lora_b.values())


def test_from_zeros_takes_base_weights_and_never_adapters():
    peft_model, masks = sparse_peft_llama()
    # lora_B starts at exactly zero, and lora_A sits next to it: neither may become a mask.
    callback = SparsityMaskCallback.from_zeros(peft_model)
    assert set(callback.masks) == set(masks)
    assert all(torch.equal(callback.masks[name], keep) for name, keep in masks.items())
    adapter = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    with pytest.raises(ValueError, match="adapter parameter; adapters are never masked"):
        SparsityMaskCallback.from_zeros(peft_model, [adapter])
    named = SparsityMaskCallback({adapter: torch.ones(64, 4, dtype=torch.bool)})
    with pytest.raises(
        ValueError, match=r"PEFT adapter parameters \(model\.layers\.0\.self_attn\.q_proj\.lora_B"
    ):
        named.verify(peft_model)


def test_unknown_names_suggest_plain_names_of_a_peft_model():
    peft_model, _ = sparse_peft_llama()
    callback = SparsityMaskCallback(
        {"model.layers.0.self_attn.q_prj.weight": torch.ones(64, 64, dtype=torch.bool)}
    )
    with pytest.raises(KeyError, match=r"did you mean 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        callback.verify(peft_model)


def test_warns_that_a_peft_merge_revives_masked_weights_and_says_how_to_keep_them(caplog):
    peft_model, masks = sparse_peft_llama()
    callback = SparsityMaskCallback(masks)
    with caplog.at_level(logging.WARNING, logger="hfprune.callbacks.sparsity_mask"):
        callback.apply_to_weights(peft_model)
    assert (
        "merge_and_unload()" in caplog.text
        and "hfprune.training.recovery.lora.merge_lora(model, masks)" in caplog.text
    )
    # The warning is warranted: peft's merge of trained (nonzero) adapters fills the pruned weights.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    assert sum(callback.count_escaped(peft_model.merge_and_unload()).values()) > 0


def test_restricted_adapters_do_not_warn(caplog):
    from hfprune.training.recovery.lora import wrap_lora
    from hfprune.training.recovery.specs import LoraSpec

    peft_model, masks = sparse_peft_llama()
    restricted = wrap_lora(peft_model.unload(), LoraSpec(rank=4), masks=masks)
    with caplog.at_level(logging.WARNING, logger="hfprune.callbacks.sparsity_mask"):
        SparsityMaskCallback(masks).apply_to_weights(restricted)
    assert "merge" not in caplog.text


def test_callbacks_import_neither_peft_nor_trl():
    # transformers' Trainer modules import peft themselves when it is installed, so peft cannot be absent at
    # run time; the callbacks' own code must not import it (nor trl, which nothing else loads).
    import ast
    from pathlib import Path

    import hfprune.callbacks

    for source in Path(hfprune.callbacks.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("peft", "trl")], (source.name, names)
    script = "import sys, hfprune.callbacks, hfprune.training.recovery\nassert 'trl' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
