"""Calibration passes: streamed statistics hold no activations, the sequential walk keeps its budget and
shares the layers' arguments, and the Minitron-depth losses equal plain cross entropy."""

from __future__ import annotations

import copy
import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
from conftest import tiny_family_model, tiny_model

from hfprune.models.structure import decoder_layers
from hfprune.pruners import get_method, get_pruner
from hfprune.pruners._blocks import chunked_nll
from hfprune.pruners.calibration import LayerWalk, stream_forward, trace_decoder


def ids(samples: int, seq_len: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, 384, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def make(name: str, **options):
    cls = get_pruner(name)
    return cls(cls.Options(**options))


def live_tensors() -> int:
    gc.collect()
    return sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())


# -- streaming ---------------------------------------------------------------------------------------
def test_streaming_stops_after_the_last_layer_and_keeps_no_activation():
    model, seen, head_calls = tiny_model(), [], []
    model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    model.model.norm.register_forward_hook(lambda *_: head_calls.append(1))

    def watch(_module, _args, output):  # every activation a hook sees, by weak reference
        seen.append(weakref.ref(output[0] if isinstance(output, tuple) else output))

    for layer in decoder_layers(model):
        layer.register_forward_hook(watch)
    assert stream_forward(model, ids(6), 2, "test") == 6 * 24
    gc.collect()
    assert len(seen) == 3 * 8 and not head_calls, "the final norm and LM head never run"
    assert all(ref() is None for ref in seen), "no hidden state outlives the pass"


@pytest.mark.parametrize("method", ["shortgpt", "minitron_width", "flap", "minitron_depth", "wanda"])
def test_live_tensors_do_not_grow_with_the_number_of_windows(method):
    """Tensors alive when the last layer has run, in batch 2 and in the last batch of a 4-window and of a
    16-window pass: the same number each time (statistics are kept, activations and windows are not).
    `wanda` here is its one-shot `score`, streamed like the structured methods."""
    model, counts = tiny_model(), []
    for windows in (4, 16):
        batch, counted = [0], set()

        def count(*_args, last=windows, batch=batch, counted=counted) -> None:
            if batch[0] in (2, last) and batch[0] not in counted:  # minitron_depth reruns the last layer
                counted.add(batch[0])
                counts.append(live_tensors())

        def enter(*_args, batch=batch) -> None:
            batch[0] += 1

        handles = [
            model.model.embed_tokens.register_forward_pre_hook(enter),
            model.model.layers[-1].register_forward_hook(count),
        ]
        make(method, **({"alignment": 8} if method in ("minitron_width", "flap") else {})).score(
            model, ids(windows), batch_size=1
        )
        for handle in handles:
            handle.remove()
    assert len(counts) == 4 and len(set(counts)) == 1, counts


def test_shortgpt_scores_do_not_depend_on_the_batch_size():
    model, batch = tiny_model(), ids(6)
    one, three = make("shortgpt").score(model, batch, 1), make("shortgpt").score(model, batch, 3)
    torch.testing.assert_close(one, three, rtol=1e-6, atol=1e-9)
    assert one.device.type == "cpu" and one.dtype == torch.float64


def test_trace_holds_every_layer_input_as_the_full_forward_computes_it():
    model, batch = tiny_model(), ids(2)
    with torch.no_grad():
        reference = model(input_ids=batch, output_hidden_states=True).hidden_states
    trace = trace_decoder(model, batch)
    assert len(trace.hidden) == 9 and len(trace.kwargs) == 8
    for index in range(8):
        torch.testing.assert_close(trace.hidden[index], reference[index], rtol=0, atol=0)


# -- the sequential walk -------------------------------------------------------------------------------
def test_walk_shares_the_layer_arguments_between_windows_of_one_shape():
    model = tiny_model()
    steps = list(LayerWalk(model, ids(5), batch_size=2))
    first = steps[0].layer_kwargs
    assert len(first) == 3  # batches of 2, 2 and 1 windows
    assert first[0] is first[1] and first[2] is not first[0]  # the last batch has another shape
    cos, _sin = first[0]["position_embeddings"]
    assert cos.shape[0] == 1, "rotary tables are per position, not per window"
    assert steps[3].layer_kwargs[0]["position_embeddings"][0] is cos, "and shared by every layer"


def test_each_layer_gets_its_own_mask_where_the_family_mixes_attention_types():
    """Qwen2 with sliding and full attention layers: the walk reproduces the full forward layer by layer."""
    types = ["full_attention", "sliding_attention"] * 2
    model = tiny_family_model(
        "qwen2", layer_types=types, use_sliding_window=True, sliding_window=4, attn_implementation="eager"
    )
    batch = ids(3, seq_len=16)
    with torch.no_grad():
        reference = model(input_ids=batch, output_hidden_states=True).hidden_states
    steps = list(LayerWalk(model, batch, batch_size=3))
    for step in steps[:-1]:
        torch.testing.assert_close(torch.cat(step.outputs), reference[step.index + 1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(
        steps[0].layer_kwargs[0]["attention_mask"], steps[1].layer_kwargs[0]["attention_mask"]
    )


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("budget_batches", [0, 2])
def test_a_spilled_walk_prunes_exactly_as_one_held_in_memory(method, budget_batches):
    parent, batch = tiny_model(num_hidden_layers=3), ids(5)
    batch_bytes = 1 * 24 * 64 * 4  # one window of 24 tokens x 64 channels in fp32
    held = make(method).prune(copy.deepcopy(parent), batch, 0.5)
    spilled = make(method, max_activation_bytes=budget_batches * batch_bytes).prune(
        copy.deepcopy(parent), batch, 0.5
    )
    assert all(torch.equal(held.masks[name], spilled.masks[name]) for name in held.masks)
    assert all(
        torch.equal(a, b)
        for a, b in zip(held.model.state_dict().values(), spilled.model.state_dict().values(), strict=True)
    )
    report = spilled.details["activations"]
    assert report["held_batches"] == budget_batches and report["spilled_batches"] == 5 - budget_batches
    assert report["held_bytes"] <= report["budget_bytes"] and report["batch_bytes"] == batch_bytes
    assert held.details["activations"]["spilled_batches"] == 0
    folder = report["spill_folder"]
    del spilled
    gc.collect()
    assert folder is None or not Path(folder).exists(), "spilled activations are deleted with the walk"


def test_the_walk_logs_what_it_holds(caplog):
    with caplog.at_level(logging.INFO, logger="hfprune.pruners.activation_store"):
        walk = LayerWalk(tiny_model(num_hidden_layers=2), ids(4), 1, "wanda sequential", 2 * 24 * 64 * 4)
        for _step in walk:
            pass
    [message] = [r.getMessage() for r in caplog.records if r.name == "hfprune.pruners.activation_store"]
    assert "4 calibration batches" in message and "2 held on cpu" in message and "2 spilled to" in message
    assert walk.report["held_bytes"] == 2 * 24 * 64 * 4


def test_budget_is_a_validated_option_of_the_calibrated_sparse_methods():
    assert get_pruner("wanda").Options().max_activation_bytes == 4 * 2**30
    assert get_method("sparsegpt").options.problems({"max_activation_bytes": -1})[0][0] == (
        "options.max_activation_bytes"
    )
    assert get_method("magnitude").options.problems({"max_activation_bytes": 1})[0][1] == "unknown option"


# -- Minitron depth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_equals_cross_entropy_over_the_whole_vocabulary(bias):
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden, targets = torch.randn(12, 16, generator=gen), torch.randint(0, 50, (12,), generator=gen)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
        for elements in (12 * 7, 12 * 50, 10**6):  # slices of 7 words, the whole vocabulary, one slice
            got = chunked_nll(hidden, head, targets, logit_elements=elements)
            torch.testing.assert_close(got, expected.double(), rtol=1e-6, atol=1e-5)


def test_minitron_depth_full_sweep_matches_the_models_own_loss():
    model, batch = tiny_model(num_hidden_layers=4), ids(2, seq_len=16)
    scores = make("minitron_depth").score(model, batch, batch_size=1)
    layers = list(model.model.layers)
    with torch.no_grad():
        for length in (1, 2, 3):
            for start, value in enumerate(scores.perplexity[length]):
                model.model.layers = torch.nn.ModuleList(layers[:start] + layers[start + length :])
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                assert value == pytest.approx(float(torch.exp(loss)), rel=1e-5)
    model.model.layers = torch.nn.ModuleList(layers)
    assert scores.baseline == pytest.approx(
        float(torch.exp(model(input_ids=batch, labels=batch).loss)), rel=1e-5
    )
