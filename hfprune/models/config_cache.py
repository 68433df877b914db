"""The parent configs a process has read, so plans and dry runs read each parent's config once.

Used by `hfprune.hub.load_parent_config`: a GGUF header is a full parse of the file, and a sweep's
preflight and dry run ask for the config of every cell. An entry is keyed by the parent spec and the size
and time of its local files, so a config changed on disk is read again; callers get their own copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any


_CONFIGS: dict[tuple, Any] = {}


def cached_config(spec: Any, read: Callable[[], Any], check: Callable[[Any], None]) -> Any:
    """A copy of the config `read()` returns for `spec`, read (and `check`ed: it raises for a config that
    cannot be used) at most once while its files are unchanged."""
    key = _key(spec)
    if key not in _CONFIGS:
        config = read()
        check(config)
        _CONFIGS[key] = config
    return copy.deepcopy(_CONFIGS[key])


def _key(spec: Any) -> tuple:
    described = spec.model_dump_json() if hasattr(spec, "model_dump_json") else repr(spec)
    folder = Path(spec.model).expanduser()
    files = [folder / name for name in ("config.json", spec.gguf_file) if name]
    return (described, tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()))
