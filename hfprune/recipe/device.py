"""What `parent.device` may say, checked without torch: `hfprune.recipe.schema` validates recipes with it.

`hfprune.models.placement` resolves a valid value to a device on this machine; this module only knows the
spelling (auto | cpu | cuda | cuda:N | N), so validating a recipe imports no accelerator stack.
"""

from __future__ import annotations

import re
from typing import Any


CUDA_SPEC = re.compile(r"^cuda(:(\d+))?$")


def device_spec_problem(spec: Any) -> str | None:
    """Why `spec` is not a valid `parent.device` value (None when it is); needs no hardware."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        return f"must be auto, cpu, cuda, cuda:N or a device index N, got {spec!r}"
    if isinstance(spec, int):
        return None if spec >= 0 else f"a device index must be 0 or more, got {spec}"
    if spec in ("auto", "cpu") or CUDA_SPEC.match(spec):
        return None
    return f"must be auto, cpu, cuda, cuda:N or a device index N, got {spec!r}"
