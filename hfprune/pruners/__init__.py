"""The pruner registry: registry keys used in recipes -> `Pruner` classes.

Pruners register themselves with `@register_pruner`; this module imports each pruner module
explicitly (no package walking), so the registry is complete after `import hfprune.pruners`.
Unknown names fail with a did-you-mean, duplicate names fail at import.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

from hfprune.errors import InvalidInput
from hfprune.pruners.base import Granularity, Pruner, PruneResult, PrunerOptions, TargetShape


PRUNERS: dict[str, type[Pruner]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class UnknownPrunerError(InvalidInput, KeyError):
    """Raised for a method name that is not in the registry; the message suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_pruner(name: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator adding a pruner under `name` (lower_snake, unique)."""

    def decorator(cls: type[Pruner]) -> type[Pruner]:
        if not _NAME.match(name):
            raise ValueError(f"pruner name {name!r} must be lower_snake_case")
        if name in PRUNERS:
            raise ValueError(
                f"pruner {name!r} is registered twice ({PRUNERS[name].__qualname__}, {cls.__qualname__})"
            )
        if not isinstance(getattr(cls, "granularity", None), Granularity):
            raise TypeError(f"pruner {name!r} must declare a Granularity")
        cls.name = name
        PRUNERS[name] = cls
        return cls

    return decorator


def get_pruner(name: str) -> type[Pruner]:
    """Look up a pruner class; an unknown name raises `UnknownPrunerError` with suggestions."""
    try:
        return PRUNERS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), PRUNERS, n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownPrunerError(
            f"unknown method {name!r}; {hint}known methods: {', '.join(sorted(PRUNERS))}"
        ) from None


from hfprune.pruners import depth, sparse, width  # noqa: E402  (registration happens on import)


__all__ = [
    "PRUNERS",
    "Granularity",
    "PruneResult",
    "Pruner",
    "PrunerOptions",
    "TargetShape",
    "UnknownPrunerError",
    "depth",
    "get_pruner",
    "register_pruner",
    "sparse",
    "width",
]
