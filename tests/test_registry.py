"""The pruner registry: loud on duplicates and malformed names, helpful on unknown names."""

from __future__ import annotations

import pytest

from hfprune.pruners import PRUNERS, UnknownPrunerError, get_pruner, register_pruner
from hfprune.pruners.base import Granularity
from hfprune.pruners.depth import ShortGPTPruner


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownPrunerError, match="did you mean 'shortgpt'"):
        get_pruner("shortgtp")
    with pytest.raises(UnknownPrunerError, match="known methods: .*shortgpt"):
        get_pruner("zzz")


def test_duplicate_and_malformed_names_fail():
    with pytest.raises(ValueError, match="registered twice"):
        register_pruner("shortgpt")(ShortGPTPruner)
    with pytest.raises(ValueError, match="lower_snake_case"):
        register_pruner("Short-GPT")(ShortGPTPruner)
    assert PRUNERS["shortgpt"] is ShortGPTPruner


def test_every_pruner_declares_its_contract():
    for name, cls in PRUNERS.items():
        assert cls.name == name
        assert isinstance(cls.granularity, Granularity)
        assert isinstance(cls.needs_calibration, bool)
