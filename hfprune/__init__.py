"""hfprune: prune a Hugging Face Llama-family parent into a small model, train it beside a random-init twin,
evaluate both and publish them.

The public surface is small on purpose: recipes (`load_recipe`), the pipeline (`run`), the pruner
registry (`get_pruner`, `METHODS`) and, for other training scripts, the callbacks in
`hfprune.callbacks`. The first four are importable from `hfprune` itself, loaded on first use (a module
`__getattr__`), so `import hfprune` stays cheap and importing `hfprune.callbacks` does not pull in the
pipeline, the pruners or their dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any


__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "load_recipe": "hfprune.recipe.schema",
    "run": "hfprune.pipeline.runner",
    "get_pruner": "hfprune.pruners",
    "METHODS": "hfprune.pruners",
}

__all__ = ["METHODS", "__version__", "get_pruner", "load_recipe", "run"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hfprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
