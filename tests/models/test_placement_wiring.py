"""Placement wired into the stages: the parent, the pruned and the trained models compute on
`parent.device` (auto: the accelerator when there is one), each stage logs its device and dtype, and under
torchrun pruning and evaluation run on the main process only."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import transformers

from hfprune import distributed
from hfprune.models import placement
from hfprune.pipeline import runner as pipeline
from hfprune.recipe.schema import load_recipe


def test_auto_resolves_to_the_cpu_without_cuda_and_every_stage_logs_it(write_recipe, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="hfprune"):
        pipeline.run(load_recipe(write_recipe()))
    messages = [r.getMessage() for r in caplog.records]
    for stage in ("parent_eval", "prune", "pruned_eval"):
        assert f"{stage} runs on cpu, float32" in messages, messages
    assert any(m.startswith("pruned_eval: on cpu in float32") for m in messages)


def test_a_pretended_accelerator_receives_the_parent_and_the_pruned_model(write_recipe, monkeypatch, caplog):
    """CUDA pretended (two devices, plenty free): the models are moved to parent.device, cuda:1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(placement, "free_bytes", lambda device: 80 * 2**30)
    moves: list[tuple[int, str]] = []

    def to(self, *args, **kwargs):  # records the move, keeps the weights where they can compute here
        moves.append((self.config.num_hidden_layers, str(args[0] if args else kwargs.get("device"))))
        return self

    monkeypatch.setattr(transformers.LlamaForCausalLM, "to", to)
    with caplog.at_level(logging.INFO, logger="hfprune"):
        pipeline.run(load_recipe(write_recipe(), ["parent.device=cuda:1"]))
    assert (8, "cuda:1") in moves  # the parent, on loading
    assert (4, "cuda:1") in moves  # the pruned model, for its evaluation (ShortGPT at 0.5 keeps 4 of 8)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("pruned_eval: on cuda:1 in float32") for m in messages), messages


def test_a_device_the_machine_lacks_is_refused(write_recipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(placement.DeviceError, match="asks for CUDA"):
        pipeline.run(load_recipe(write_recipe(), ["parent.device=cuda"]))


def test_under_torchrun_pruning_and_evaluation_run_on_the_main_process_only(write_recipe, monkeypatch):
    recipe = load_recipe(write_recipe("train:\n  token_budget: 512\n  seq_len: 64\n"))
    table = pipeline.stage_table(recipe)
    assert {name for name, stage in table.items() if stage.all_ranks} == {
        f"train_{run}" for run in recipe.train.runs
    }
    ran: list[str] = []
    run = pipeline.Pipeline(recipe)
    for name, stage in run.context.table.items():
        run.context.table[name] = dataclasses.replace(stage, action=lambda ctx, name=name: ran.append(name))
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)  # rank 1 of 2
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    run.execute()
    assert ran == [f"train_{r}" for r in recipe.train.runs]


def test_a_sweep_prunes_its_shared_parent_in_place_and_reloads_it_for_the_next_cell(
    write_recipe, monkeypatch
):
    from hfprune.hub import Parent
    from hfprune.pipeline import providers
    from hfprune.sweep.runner import SharedParent

    loads: list[object] = []

    def load(spec):
        loads.append(spec)
        return Parent(model=torch.nn.Linear(1, 1), tokenizer=None)

    monkeypatch.setattr(providers, "load_parent", load)
    recipe, shared = load_recipe(write_recipe()), SharedParent()
    parent = shared.get(recipe)
    assert shared.get(recipe) is parent and len(loads) == 1  # evaluation and scores share one load
    assert shared.model_to_prune(parent) is parent.model  # pruned in place: no copy beside it
    assert shared.get(recipe) is not parent and len(loads) == 2  # the next cell reloads it from disk
