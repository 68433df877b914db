"""ShortGPT: Block Influence from layer-wise calibration, and layer removal that equals doing it by hand."""

from __future__ import annotations

import copy

import torch
from conftest import tiny_model
from transformers import DynamicCache

from hfprune.pruners import get_pruner
from hfprune.pruners.calibration import LayerWalk
from hfprune.pruners.depth import plan_layer_removal


def ids(n: int = 3, seq: int = 24) -> torch.Tensor:
    return torch.randint(2, 384, (n, seq), generator=torch.Generator().manual_seed(1))


def test_the_layer_walk_reproduces_the_full_forward_hidden_states():
    model = tiny_model()
    batch = ids()
    with torch.no_grad():
        reference = model(input_ids=batch, output_hidden_states=True).hidden_states
    steps = list(LayerWalk(model, batch, batch_size=2))
    assert [s.index for s in steps] == list(range(8))
    for step in steps[:-1]:  # the last hidden state returned by the model is after the final norm
        got = torch.cat(step.outputs)
        torch.testing.assert_close(got, reference[step.index + 1], rtol=1e-5, atol=1e-5)


def test_block_influence_matches_a_direct_computation():
    model = tiny_model()
    batch = ids()
    with torch.no_grad():
        hidden = model(input_ids=batch, output_hidden_states=True).hidden_states
    expected = [
        1 - torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1).mean().item()
        for i in range(7)
    ]
    scores = get_pruner("shortgpt")().score(model, batch)
    torch.testing.assert_close(scores[:7], torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_pruned_logits_equal_removing_the_same_layers_by_hand():
    parent = tiny_model()
    batch = ids()
    result = get_pruner("shortgpt")().prune(copy.deepcopy(parent), batch, 0.5)
    kept = result.details["kept_layers"]
    assert len(kept) == 4 and result.model.config.num_hidden_layers == 4
    scores = torch.tensor(result.details["scores"])
    assert set(kept) == set(torch.topk(scores, 4).indices.tolist())

    by_hand = copy.deepcopy(parent)
    by_hand.model.layers = torch.nn.ModuleList(by_hand.model.layers[i] for i in kept)
    by_hand.config.num_hidden_layers = 4
    with torch.no_grad():
        out, ref = result.model(batch, use_cache=False).logits, by_hand(batch, use_cache=False).logits
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_layers_are_renumbered_so_the_kv_cache_works():
    parent = tiny_model()
    result = get_pruner("shortgpt")().prune(parent, ids(), 0.5)
    assert [layer.self_attn.layer_idx for layer in result.model.model.layers] == [0, 1, 2, 3]
    prompt = ids(1, 10)
    with torch.no_grad():
        cached = result.model.generate(
            prompt, max_new_tokens=5, do_sample=False, past_key_values=DynamicCache()
        )
        full = prompt
        for _ in range(5):  # greedy decoding without a cache, one token at a time
            next_token = result.model(full).logits[:, -1].argmax(-1, keepdim=True)
            full = torch.cat([full, next_token], dim=1)
    assert torch.equal(cached, full)


def test_plan_picks_the_nearest_layer_count():
    config = tiny_model().config
    assert plan_layer_removal(config, 0.5).config_changes == {"num_hidden_layers": 4}
    assert plan_layer_removal(config, 0.8).config_changes == {"num_hidden_layers": 2}  # 0.75 is nearest
    assert plan_layer_removal(config, 0.99).config_changes == {"num_hidden_layers": 1}  # never zero layers
    assert plan_layer_removal(config, 0.0).config_changes == {"num_hidden_layers": 8}
