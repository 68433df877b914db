"""Structured pruners on the tiny parent: the surgery is exact, choices match their definitions, and the
checkpoints are ordinary Llama checkpoints that load without hfprune."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model

from hfprune.architectures.llama import LLAMA
from hfprune.models.structure import decoder_layers
from hfprune.pruners import get_pruner
from hfprune.pruners._ops import keep_ffn_neurons, keep_hidden_channels, keep_kv_groups
from hfprune.pruners.shapes import ShapeSpace
from hfprune.pruners.width import FlapScores, WidthScores


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: on a shared machine, intra-op threads spin-waiting cost far more than the math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name: str, **options):
    cls = get_pruner(name)
    return cls(cls.Options(**options))


def ids(samples: int = 4, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 384, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_keeping_every_channel_reproduces_the_parent_exactly():
    parent = tiny_model(tie_word_embeddings=True)
    model = copy.deepcopy(parent)
    config = model.config
    keep_hidden_channels(model, range(config.hidden_size))
    for layer in decoder_layers(model):
        keep_ffn_neurons(LLAMA, layer, range(config.intermediate_size))
        keep_kv_groups(LLAMA, layer, range(config.num_key_value_heads), 2, config.head_dim)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits(model, ids()), logits(parent, ids()), rtol=0, atol=0)


def test_width_pruning_keeps_the_scored_channels_and_stays_tied():
    parent = tiny_model(tie_word_embeddings=True)
    config = parent.config
    hidden = torch.arange(config.hidden_size, dtype=torch.float64).flip(0)  # low indices score highest
    ffn = torch.rand(
        config.num_hidden_layers, config.intermediate_size, generator=torch.Generator().manual_seed(1)
    )
    pruner = make("minitron_width", alignment=4)
    result = pruner.apply(copy.deepcopy(parent), WidthScores(hidden, ffn), 0.5)
    model, details = result.model, result.details
    h, f = model.config.hidden_size, model.config.intermediate_size
    assert details["kept_hidden_channels"] == list(range(h)) and h < config.hidden_size
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.embed_tokens.weight, parent.model.embed_tokens.weight[:, :h])
    for index, (layer, kept) in enumerate(
        zip(decoder_layers(model), details["kept_ffn_neurons"], strict=True)
    ):
        assert kept == sorted(torch.topk(ffn[index], f).indices.tolist())
        source = decoder_layers(parent)[index]
        torch.testing.assert_close(layer.mlp.down_proj.weight, source.mlp.down_proj.weight[:h][:, kept])
        torch.testing.assert_close(layer.self_attn.q_proj.weight, source.self_attn.q_proj.weight[:, :h])
        torch.testing.assert_close(layer.input_layernorm.weight, source.input_layernorm.weight[:h])
    assert model.config.head_dim == 16 and model.config.num_attention_heads == 4
    assert torch.isfinite(logits(model, ids())).all()


def flap_scores(parent, drop_group: int, seed: int = 0) -> FlapScores:
    """Scores that make every layer lose KV group `drop_group`, with random FFN scores and means."""
    config, gen = parent.config, torch.Generator().manual_seed(seed)
    layers, groups = config.num_hidden_layers, config.num_key_value_heads
    group_scores = torch.ones(layers, groups, dtype=torch.float64)
    group_scores[:, drop_group] = -1
    q_width = config.num_attention_heads * config.head_dim
    return FlapScores(
        groups=group_scores,
        ffn=torch.rand(layers, config.intermediate_size, generator=gen, dtype=torch.float64),
        attention_mean=torch.randn(layers, q_width, generator=gen, dtype=torch.float64),
        ffn_mean=torch.randn(layers, config.intermediate_size, generator=gen, dtype=torch.float64),
    )


def ratio_of(config, **changes) -> float:
    return ShapeSpace(config).ratio({"head_dim": config.head_dim, **changes})


@pytest.mark.parametrize("drop_group", [0, 1])
def test_removing_a_kv_group_equals_zeroing_its_output_in_the_parent(drop_group):
    parent = tiny_model()
    # The ratio that removing one group (of two) with the FFN untouched reaches: FLAP must keep every neuron.
    ratio = ratio_of(parent.config, num_attention_heads=2, num_key_value_heads=1)
    pruner = make("flap", alignment=8, kv_groups_removed=1)
    result = pruner.apply(copy.deepcopy(parent), flap_scores(parent, drop_group), ratio)
    assert result.details["kept_kv_groups"] == [[1 - drop_group]] * 8
    assert result.model.config.intermediate_size == parent.config.intermediate_size
    assert result.model.config.head_dim == 16 and result.model.config.num_attention_heads == 2
    emulated = copy.deepcopy(parent)
    with torch.no_grad():
        for layer in decoder_layers(emulated):
            layer.self_attn.o_proj.weight[:, drop_group * 32 : (drop_group + 1) * 32] = 0
    tokens = ids()
    assert not torch.allclose(logits(emulated, tokens), logits(parent, tokens), atol=1e-3)
    torch.testing.assert_close(logits(result.model, tokens), logits(emulated, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compensation", ["attention", "both"])
def test_bias_compensation_adds_the_removed_channels_mean_contribution(compensation):
    parent = tiny_model()
    scores = flap_scores(parent, drop_group=0)
    result = make("flap", alignment=8, bias_compensation=compensation).apply(
        copy.deepcopy(parent), scores, 0.5
    )
    config = result.model.config
    assert config.attention_bias is True and config.mlp_bias is (compensation == "both")
    assert result.details["bias_compensation"] == compensation and result.details["attention_bias"] is True
    # The same model built by hand in the parent: removed inputs replaced by their calibration means.
    emulated = copy.deepcopy(parent)
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(emulated)):
            o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj
            o_proj.bias = torch.nn.Parameter(
                o_proj.weight[:, :32] @ scores.attention_mean[index, :32].float()
            )
            o_proj.weight[:, :32] = 0
            removed = sorted(set(range(128)) - set(result.details["kept_ffn_neurons"][index]))
            if compensation == "both":
                down.bias = torch.nn.Parameter(
                    down.weight[:, removed] @ scores.ffn_mean[index, removed].float()
                )
            down.weight[:, removed] = 0
    tokens = ids()
    torch.testing.assert_close(logits(result.model, tokens), logits(emulated, tokens), rtol=1e-5, atol=1e-5)


def test_flap_scores_are_standardised_and_scoring_reads_real_activations():
    parent = tiny_model()
    scores = make("flap", alignment=8).score(parent, ids())
    for table in (scores.groups, scores.ffn):
        assert table.mean().abs() < 1e-9 and table.std() == pytest.approx(1.0)
    assert scores.groups.shape == (8, 2) and scores.ffn.shape == (8, 128)
    assert scores.ffn_mean.abs().sum() > 0 and not torch.equal(scores.groups[0], scores.groups[1])


def brute_force_block(parent, tokens: torch.Tensor, length: int) -> tuple[int, list[float]]:
    """Try every contiguous block on a copy; perplexity from the model's own loss."""
    model, count = copy.deepcopy(parent), parent.config.num_hidden_layers
    layers = list(model.model.layers)

    def ppl(kept: list) -> float:
        model.model.layers = torch.nn.ModuleList(kept)
        model.config.num_hidden_layers = len(kept)
        with torch.no_grad():
            return float(torch.exp(model(input_ids=tokens, labels=tokens, use_cache=False).loss))

    baseline = ppl(layers)
    values = [ppl(layers[:start] + layers[start + length :]) for start in range(count - length + 1)]
    best = min(range(len(values)), key=lambda i: abs(values[i] - baseline))
    return best, values


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_minitron_depth_removes_the_block_a_brute_force_search_picks(ratio):
    parent, tokens = tiny_model(), ids(samples=2, seq_len=32)
    length = round(8 * ratio)
    expected, values = brute_force_block(parent, tokens, length)
    result = make("minitron_depth").prune(copy.deepcopy(parent), tokens, ratio, batch_size=2)
    block = result.details["removed_block"]
    assert block == {"start": expected, "length": length}
    assert result.details["kept_layers"] == [i for i in range(8) if not expected <= i < expected + length]
    assert result.details["block_perplexity"] == pytest.approx(values, rel=1e-4)
    assert len(set(values)) == len(values), "the tiny parent must make blocks distinguishable"
    assert [layer.self_attn.layer_idx for layer in decoder_layers(result.model)] == list(range(8 - length))


SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    for folder in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        saved = torch.load(folder + "/expected.pt")
        with torch.no_grad():
            out = model(input_ids=saved["ids"]).logits
        torch.testing.assert_close(out, saved["logits"], rtol=0, atol=0)
    assert "hfprune" not in sys.modules, "loading imported hfprune"
    print("loaded", len(json.loads(sys.argv[1])))
    """
)


def test_checkpoints_reload_without_hfprune(tmp_path):
    tokens, folders = ids(samples=2, seq_len=16), []
    cases = {
        "minitron_depth": {},
        "minitron_width": {"alignment": 4},
        "flap": {"alignment": 8, "bias_compensation": "attention"},
    }
    for name, options in cases.items():
        parent = tiny_model(tie_word_embeddings=name == "minitron_width")
        result = make(name, **options).prune(parent, tokens, 0.5)
        folder = tmp_path / name
        result.model.save_pretrained(folder)
        torch.save({"ids": tokens, "logits": logits(result.model, tokens)}, folder / "expected.pt")
        saved = json.loads((folder / "config.json").read_text())
        assert saved["model_type"] == "llama" and "auto_map" not in saved
        folders.append(str(folder))
    assert json.loads((tmp_path / "flap" / "config.json").read_text())["attention_bias"] is True
    assert json.loads((tmp_path / "minitron_width" / "config.json").read_text())["head_dim"] == 16
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, json.dumps(folders)],
        check=False,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded 3" in done.stdout


def test_prune_report_lists_what_was_kept(write_recipe):
    from hfprune.pipeline.runner import run
    from hfprune.recipe.schema import load_recipe

    extra = "  options: {alignment: 8, bias_compensation: attention}\n"
    path = write_recipe(method="flap")
    text = path.read_text().replace("  ratio: 0.5\n", "  ratio: 0.5\n" + extra)
    path.write_text(text)
    recipe = load_recipe(path)
    run(recipe, stop_after="prune")
    report = json.loads((recipe.output_path / "models" / "pruned" / "prune_report.json").read_text())
    assert report["method"] == "flap" and report["bias_compensation"] == "attention"
    assert len(report["kept_kv_groups"]) == 8 and all(len(g) == 1 for g in report["kept_kv_groups"])
    assert len(report["kept_ffn_neurons"]) == 8
    assert abs(report["ratio_achieved"] - 0.5) <= 0.03
