"""The decoder families hfprune prunes, one module each: the only place family names live.

A family is one module with its `ArchitectureSpec` (`base.py`: layer paths, norms, projection names,
biases, per-head norms, the legal-shape rule, the parameter formula), registered in `registry.py`, the
registry the rest of hfprune reads. Importing this package imports every family, so the registry is
complete; adding a family is one module and one name below.
"""

from hfprune.architectures import llama, mistral, qwen2, qwen3  # noqa: F401  (each module registers its spec)
