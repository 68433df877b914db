"""The architecture registry: `model_type` -> `ArchitectureSpec`.

Each family module of `hfprune.architectures` registers its spec here on import, and the package imports
every family module, so the registry is complete whenever any part of the package is imported. A parent
is accepted when its config's `model_type` is registered and every class its `architectures` names is
that family's causal LM; `check_supported` needs the config alone, so a recipe's parent can be refused
before any weight is read.
"""

from __future__ import annotations

from typing import Any

from hfprune.architectures.base import ArchitectureSpec
from hfprune.errors import RunFailure


ARCHITECTURES: dict[str, ArchitectureSpec] = {}


class UnsupportedArchitectureError(RunFailure, ValueError):
    """The parent's `model_type` (or its model class) is not one the registry knows."""


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add `spec` under its `model_type`; a second spec for the same type is a bug."""
    if spec.model_type in ARCHITECTURES:
        raise ValueError(f"architecture {spec.model_type!r} is registered twice")
    ARCHITECTURES[spec.model_type] = spec
    return spec


def known_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def _supported() -> str:
    return ", ".join(f"{s.model_type} ({s.causal_lm})" for _, s in sorted(ARCHITECTURES.items()))


def architecture_of(config: Any) -> ArchitectureSpec:
    """The spec of `config` (a config, or anything with `model_type` and `architectures`)."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    architectures = getattr(config, "architectures", None) or []
    if spec is not None and all(name == spec.causal_lm for name in architectures):
        return spec
    found = ", ".join(architectures) or model_type or "unknown"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {found} (model_type={model_type!r}); hfprune supports the decoder "
        f"families {_supported()}, tied embeddings included"
    )


def check_supported(config: Any) -> None:
    """Raise `UnsupportedArchitectureError` naming the architecture and the known model types."""
    architecture_of(config)
