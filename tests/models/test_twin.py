"""The scratch twin: same architecture and size, fresh and reproducible weights, masks and ties kept;
built from the pruned model's folder without loading its weights, with the published numbers."""

import hashlib

import pytest
import torch
from conftest import scratch_twin_of, tiny_shape
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

import hfprune.models.twin
from hfprune.architectures.registry import ARCHITECTURES
from hfprune.masks.packed import PackedMask
from hfprune.masks.storage import load_packed_masks, save_masks
from hfprune.models.twin import causal_lm_class, scratch_twin_from_folder


def pruned_llama(tie: bool = False) -> LlamaForCausalLM:
    """Stands in for a pruned model: a non-default shape and weights unlike a fresh init (norms too)."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(123)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model


def sparse_masks(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    masks = {
        name: torch.rand(p.shape, generator=gen) < 0.4
        for name, p in model.named_parameters()
        if ".layers." in name and p.ndim == 2
    }
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].masked_fill_(~keep, 0)
    return masks


def config_of(model: PreTrainedModel) -> dict:
    """The model's config, less the folder it was read from."""
    return {key: value for key, value in model.config.to_dict().items() if key != "_name_or_path"}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_twin_has_the_same_architecture_and_fresh_reproducible_weights(tmp_path):
    pruned = pruned_llama()
    twin = scratch_twin_of(pruned, tmp_path / "pruned", seed=0)
    assert type(twin) is type(pruned)
    assert config_of(twin) == config_of(pruned)
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert twin.state_dict().keys() == pruned.state_dict().keys()
    for (name, fresh), old in zip(twin.state_dict().items(), pruned.state_dict().values(), strict=True):
        assert fresh.shape == old.shape and not torch.equal(fresh, old), name
    # The model's own initialiser: std initializer_range for matrices, ones for RMSNorm weights.
    assert twin.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert bool(twin.model.norm.weight.eq(1).all())

    assert same_weights(twin, scratch_twin_from_folder(tmp_path / "pruned", seed=0))
    assert not same_weights(twin, scratch_twin_from_folder(tmp_path / "pruned", seed=1))


def test_twin_leaves_the_global_rng_alone_and_follows_dtype(tmp_path):
    folder = saved(pruned_llama(), tmp_path / "pruned")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    twin = scratch_twin_from_folder(folder, seed=0, dtype=torch.bfloat16)
    assert torch.equal(torch.rand(3), expected)
    assert twin.dtype == torch.bfloat16
    # Generated in float32 first, so a bf16 twin is the rounded float32 twin.
    fp32 = scratch_twin_from_folder(folder, seed=0)
    assert torch.equal(twin.lm_head.weight, fp32.lm_head.weight.to(torch.bfloat16))


def test_sparse_twin_keeps_the_mask_and_reinitialises_survivors(tmp_path):
    pruned = pruned_llama()
    masks = sparse_masks(pruned)
    twin = scratch_twin_of(pruned, tmp_path / "pruned", seed=0, masks=masks)
    params, old = dict(twin.named_parameters()), dict(pruned.named_parameters())
    for name, keep in masks.items():
        assert torch.count_nonzero(params[name][~keep]) == 0, name
        assert bool(params[name][keep].ne(0).all()), name
        assert not torch.equal(params[name][keep], old[name][keep]), name
    with pytest.raises(KeyError, match=r"model\.layers\.9"):
        scratch_twin_from_folder(
            tmp_path / "pruned", seed=0, masks={"model.layers.9.mlp.up_proj.weight": masks[next(iter(masks))]}
        )


@pytest.mark.parametrize("tie", [False, True])
def test_embeddings_and_norms_switch_and_ties(tmp_path, tie):
    pruned = pruned_llama(tie=tie)
    fresh = scratch_twin_of(pruned, tmp_path / "pruned", seed=0)
    kept = scratch_twin_from_folder(tmp_path / "pruned", seed=0, reinit_embeddings_and_norms=False)
    for twin in (fresh, kept):
        assert (twin.lm_head.weight is twin.model.embed_tokens.weight) is tie
    assert not torch.equal(fresh.model.embed_tokens.weight, pruned.model.embed_tokens.weight)
    assert torch.equal(kept.model.embed_tokens.weight, pruned.model.embed_tokens.weight)
    assert torch.equal(kept.model.norm.weight, pruned.model.norm.weight)
    assert torch.equal(
        kept.model.layers[2].input_layernorm.weight, pruned.model.layers[2].input_layernorm.weight
    )
    # Linear layers are re-initialised either way, the same as in the fully fresh twin.
    assert torch.equal(
        kept.model.layers[0].self_attn.q_proj.weight, fresh.model.layers[0].self_attn.q_proj.weight
    )
    assert not torch.equal(
        kept.model.layers[0].self_attn.q_proj.weight, pruned.model.layers[0].self_attn.q_proj.weight
    )
    if not tie:
        assert not torch.equal(kept.lm_head.weight, pruned.lm_head.weight)


def _digest(model: torch.nn.Module) -> str:
    """SHA-256 of every state-dict entry's name, dtype and raw bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Digests of the twins built when the quickstart's published numbers were measured (the model class's
# constructor under torch.manual_seed(seed), on the CPU in float32, then cast to the model's dtype). A
# different digest means every scratch-arm number moves: change these only on purpose, with the numbers.
GOLDEN_TWINS = {
    "plain_seed0": "ed1d9e0032e7f9a5140b193c1ff36004e57db308ddcac5d50a6526a7e57c5ff2",
    "plain_seed7": "839cf7911d2e987798d8066c8353fcb60723046df6855c21c386d974beb2cd36",
    "bf16_seed0": "d86df65bc43ed32bf543926b3fcbf3ca68b3431d5f8eb176ae93cd7572bde988",
    "tied_seed0": "9d8fdff268ddadc7eb62654104598e42cd82919b4e1b5c0485d67f32b2f4dda0",
    "tied_keep_seed0": "a4f54727155ebeaafaea8b0333054062ef50d9e8e49c46017c00527b15d5a7f8",
    "masked_seed0": "05b11c85cbcd5ae27c8e43cab3f3195b4b7007e1dd36936b979735f03072dff4",
    "masked_keep_seed3": "c29066bf89936e76c37707387fea88e1d2e6b6ec72d30f9a7ce41e76eab3998e",
}


def golden_cases() -> dict[str, tuple]:
    """Case name -> (pruned model, scratch_twin_from_folder keyword arguments)."""
    masked = pruned_llama()
    masks = sparse_masks(masked)
    packed = {name: PackedMask.of(keep) for name, keep in masks.items()}  # zeroed one parameter at a time
    return {
        "plain_seed0": (pruned_llama(), {"seed": 0}),
        "plain_seed7": (pruned_llama(), {"seed": 7}),
        "bf16_seed0": (pruned_llama().to(torch.bfloat16), {"seed": 0}),
        "tied_seed0": (pruned_llama(tie=True), {"seed": 0}),
        "tied_keep_seed0": (pruned_llama(tie=True), {"seed": 0, "reinit_embeddings_and_norms": False}),
        "masked_seed0": (masked, {"seed": 0, "masks": masks}),
        "masked_keep_seed3": (masked, {"seed": 3, "masks": packed, "reinit_embeddings_and_norms": False}),
    }


def saved(model: LlamaForCausalLM, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture
def no_full_load(monkeypatch):
    """Building the twin from a folder must not load the pruned model's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pruned model was loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(refuse))


def test_twin_from_a_folder_has_the_published_weights_without_loading_the_pruned_model(
    tmp_path, no_full_load, monkeypatch
):
    read, original = [], hfprune.models.twin._checkpoint_tensors

    def spy(*args):
        tensors = original(*args)
        read.append(sorted(tensors))
        return tensors

    monkeypatch.setattr(hfprune.models.twin, "_checkpoint_tensors", spy)
    for name, (model, kw) in golden_cases().items():
        twin = scratch_twin_of(model, tmp_path / name, **kw)
        assert _digest(twin) == GOLDEN_TWINS[name], name
        assert not twin.training and twin.dtype == model.dtype
    # Only the embeddings and norms were read from the pruned checkpoint, and only when kept.
    assert len(read) == 2
    for names in read:
        assert names and all("embed_tokens" in n or "norm" in n for n in names)


@pytest.mark.parametrize("tie", [False, True])
def test_a_sharded_bf16_folder_gives_the_twin_of_a_single_float32_file(tmp_path, tie):
    """bf16 on disk, sharded into several files: the same twin, config included, as from one float32 file
    of the same (rounded) weights."""
    pruned = pruned_llama(tie=tie)
    masks = sparse_masks(pruned)
    folder = saved(pruned.to(torch.bfloat16), tmp_path / "pruned", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    single = saved(pruned.to(torch.float32), tmp_path / "single")
    assert not (single / "model.safetensors.index.json").is_file()
    for kw in ({"seed": 5}, {"seed": 5, "masks": masks, "reinit_embeddings_and_norms": False}):
        expected = scratch_twin_from_folder(single, **kw)
        twin = scratch_twin_from_folder(folder, **kw)
        assert same_weights(twin, expected)
        assert config_of(twin) == config_of(expected)
        assert (twin.lm_head.weight is twin.model.embed_tokens.weight) is tie


def test_empty_twin_has_meta_parameters_real_buffers_and_ties(tmp_path):
    folder = saved(pruned_llama(tie=True), tmp_path / "pruned")
    real = scratch_twin_from_folder(folder, seed=0)
    torch.manual_seed(9)
    expected = torch.rand(2)
    torch.manual_seed(9)
    empty = scratch_twin_from_folder(folder, seed=0, empty=True)
    assert torch.equal(torch.rand(2), expected)  # no initialisation ran
    assert all(p.is_meta for p in empty.parameters())
    assert [(n, p.shape, p.dtype) for n, p in empty.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in real.named_parameters()
    ]
    buffers = dict(real.named_buffers())
    for name, buffer in empty.named_buffers():
        assert not buffer.is_meta and torch.equal(buffer, buffers[name]), name
    assert empty.lm_head.weight is empty.model.embed_tokens.weight


def test_twin_rejects_a_shard_of_a_mask(tmp_path):
    pruned = pruned_llama()
    masks = sparse_masks(pruned)
    save_masks(masks, tmp_path / "masks.safetensors")
    shard = load_packed_masks(tmp_path / "masks.safetensors", shard=(1, 2))
    with pytest.raises(ValueError, match="holds rows"):
        scratch_twin_of(pruned, tmp_path / "pruned", seed=0, masks=shard)


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_causal_lm_class_is_the_class_auto_model_builds(family):
    config = AutoConfig.for_model(family, **tiny_shape(num_hidden_layers=2))
    with torch.device("meta"):
        assert causal_lm_class(config) is type(AutoModelForCausalLM.from_config(config))
