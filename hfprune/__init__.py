"""hfprune: prune a Hugging Face Llama-family parent into a small model, train it beside a random-init twin,
evaluate both and publish them.

The public API, small on purpose:

- `hfprune.load_recipe` and `hfprune.run` (from `hfprune.recipe.schema` and `hfprune.pipeline.runner`):
  a recipe, and the pipeline that runs it;
- `hfprune.get_pruner`, `hfprune.build_pruner` and `hfprune.METHODS` (from `hfprune.pruners`): the pruner
  registry, its manifest readable without torch;
- `hfprune.callbacks` (`TokenBudgetCallback`, `SparsityMaskCallback`, `budget_schedule`) and
  `hfprune.trainer.PruneTrainer`, for other training scripts.

The names above are importable from `hfprune` itself, loaded on first use (a module `__getattr__`), so
`import hfprune` stays cheap and importing `hfprune.callbacks` does not pull in the pipeline, the pruners
or their dependencies. Everything else is internal: the folder tree shows its architecture (README,
"Where things live").
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
    "build_pruner": "hfprune.pruners",
    "METHODS": "hfprune.pruners",
}

__all__ = ["METHODS", "__version__", "build_pruner", "get_pruner", "load_recipe", "run"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hfprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
