"""The pruner registry: a manifest that lists methods without torch, held against the classes it names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hfprune.pruners import METHODS, UnknownPrunerError, get_method, get_pruner
from hfprune.pruners.options import Granularity, PrunerOptions


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownPrunerError, match="did you mean 'shortgpt'"):
        get_pruner("shortgtp")
    with pytest.raises(UnknownPrunerError, match="known methods: .*shortgpt"):
        get_method("zzz")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_manifest_matches_the_class_it_names(name):
    method, cls = METHODS[name], get_pruner(name)
    assert cls.name == method.name == name
    assert cls.granularity is method.granularity
    assert isinstance(method.granularity, Granularity)
    assert cls.needs_calibration is method.needs_calibration
    assert cls.Options is method.options and issubclass(method.options, PrunerOptions)
    assert method.description and cls.__doc__


def test_every_pruner_class_is_in_the_manifest():
    from hfprune.pruners import depth, width
    from hfprune.pruners.base import Pruner
    from hfprune.pruners.sparse import methods as sparse

    concrete = {
        obj.name
        for module in (depth, sparse, width)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Pruner) and "name" in vars(obj)
    }
    assert concrete == set(METHODS)


def test_listing_and_option_checks_import_no_torch():
    code = (
        "import sys; from hfprune.pruners import METHODS; "
        "problems = METHODS['wanda'].options.problems({'pattern': '3:4'}); "
        "ratio = METHODS['wanda'].options(pattern='2:4').ratio_problem(0.6); "
        "print(len(METHODS), bool(problems), bool(ratio), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(len(METHODS)), "True", "True", "False"]
