"""Every registered pruner, as a table: forward runs, save/reload round-trips, the target is hit,
ratio 0 is the identity, and scoring leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from hfprune.models.structure import count_parameters
from hfprune.pruners import METHODS, get_pruner
from hfprune.pruners.options import Granularity


# Options that suit the tiny test parent (e.g. alignments far below the 64 used for real models).
TINY_OPTIONS: dict[str, dict] = {
    "minitron_width": {"alignment": 4},
    "flap": {"alignment": 8},
}
# How close the achieved ratio must be to the request on the tiny parent (its shapes are coarse).
TOLERANCE = {Granularity.DEPTH: 0.07, Granularity.WIDTH: 0.1, Granularity.SPARSE: 0.01}
RATIOS = (0.5, 0.75)


def make(name: str):
    cls = get_pruner(name)
    return cls(cls.Options(**TINY_OPTIONS.get(name, {})))


def calibration(model, samples: int = 4, seq_len: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(2, model.config.vocab_size, (samples, seq_len), generator=generator)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=sorted(METHODS))
def name(request) -> str:
    return request.param


@pytest.mark.parametrize("ratio", RATIOS)
def test_prunes_to_a_working_model_that_hits_the_plan(name, ratio):
    parent = tiny_model()
    before = count_parameters(parent)
    pruner = make(name)
    planned = pruner.plan(parent.config, ratio)
    ids = calibration(parent)
    result = pruner.prune(copy.deepcopy(parent), ids, ratio)
    out = logits(result.model, ids)
    assert out.shape == (*ids.shape, parent.config.vocab_size)
    assert torch.isfinite(out).all()
    assert abs(result.shape.ratio_achieved - ratio) <= TOLERANCE[pruner.granularity]
    assert result.shape.ratio_achieved == pytest.approx(planned.ratio_achieved)
    if pruner.granularity is not Granularity.SPARSE:
        after = count_parameters(result.model)
        assert after == planned.params_after
        assert 1 - after.non_embedding / before.non_embedding == pytest.approx(planned.ratio_achieved)


def test_save_and_reload_round_trip(name, tmp_path):
    parent = tiny_model()
    ids = calibration(parent)
    result = make(name).prune(parent, ids, 0.5)
    result.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, tensor in result.model.state_dict().items():
        assert reloaded.state_dict()[key].shape == tensor.shape, key
    torch.testing.assert_close(logits(reloaded, ids), logits(result.model, ids), rtol=0, atol=0)


def test_ratio_zero_is_the_identity(name):
    parent = tiny_model()
    ids = calibration(parent)
    expected = logits(parent, ids)
    result = make(name).prune(copy.deepcopy(parent), ids, 0.0)
    assert result.shape.ratio_achieved == 0
    torch.testing.assert_close(logits(result.model, ids), expected, rtol=0, atol=0)


def test_scoring_does_not_change_the_model(name):
    parent = tiny_model()
    snapshot = {k: v.clone() for k, v in parent.state_dict().items()}
    make(name).score(parent, calibration(parent))
    for key, tensor in parent.state_dict().items():
        assert torch.equal(tensor, snapshot[key]), key
    assert parent.config.num_hidden_layers == 8


def test_every_pruner_documents_itself(name):
    cls = get_pruner(name)
    assert METHODS[name].description and cls.__doc__ and "method:" in cls.__doc__, (
        "doc must cite paper, score and a snippet"
    )
    assert isinstance(cls.granularity, Granularity)
