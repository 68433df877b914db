"""Listing, help and validating a recipe that needs no parent config import neither torch nor transformers.

Run in a fresh interpreter each, since the test process itself has imported both long before.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import sys\n"
    "from hfprune.cli import main\n"
    "try:\n"
    "    main({args!r})\n"
    "except SystemExit as exit:\n"
    "    code = exit.code\n"
    "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), 'EXIT', code)\n"
)


@pytest.mark.parametrize(
    "args",
    [["ls"], ["--help"], ["run", "--help"], ["validate", "--no-files", "recipes/depth_0.5.yaml"]],
    ids=" ".join,
)
def test_command_imports_no_torch(args):
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "HEAVY [] EXIT 0"


def test_the_probe_sees_torch_when_a_command_loads_it():
    code = "import sys, hfprune.pruners\nhfprune.pruners.get_pruner('wanda')\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
