"""The raw recipe: a YAML file read into a plain mapping, with command-line overrides applied.

The first step of `hfprune.recipe.schema.load_recipe` (and of `hfprune.sweep.grid.load_sweep`), before the schema
sees anything. Every way a file or an override can be wrong (missing, too large, not UTF-8, not YAML,
nested or aliased beyond reason, a bad key path or list index, a value that is not YAML) becomes a
`RecipeError` naming the file or key, never a traceback; `validation_problems` gives the schema's own
errors (pydantic's) the same form, a key path and a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hfprune.errors import InvalidInput


if TYPE_CHECKING:
    from pydantic import ValidationError


# Recipes are a few kilobytes; the cap keeps a wrong file (a dataset, a checkpoint) from being parsed
# for minutes. It is checked before reading, and the read itself is bounded (a pipe has no size).
MAX_RECIPE_BYTES = 1 << 20
# Values after expanding YAML aliases: a few anchors can otherwise expand into billions of values.
MAX_RECIPE_VALUES = 100_000

_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RecipeError(InvalidInput, ValueError):
    """An invalid recipe; `problems` holds (key path, message) pairs, all of them at once."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path or '<root>'}: {msg}" for path, msg in problems)
        super().__init__(f"invalid recipe {source}: {len(problems)} problem(s)\n{lines}")


def read_recipe_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a recipe file; `RecipeError` when it cannot be read or is not a YAML mapping."""
    source = str(path)
    raw = _parse(source, _read_text(Path(path)))
    if not isinstance(raw, dict):
        raise RecipeError(source, [("", "a recipe must be a YAML mapping")])
    try:
        size = _expanded_size(raw, {})
    except RecursionError:
        raise RecipeError(source, [("", "not valid YAML: nested too deeply")]) from None
    if size > MAX_RECIPE_VALUES:
        raise RecipeError(
            source,
            [("", f"expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases repeated recursively)")],
        )
    return raw


def _read_text(path: Path) -> str:
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(source, [("", _too_large(size))])
        with path.open("rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(source, [("", "file not found")]) from None
    except IsADirectoryError:
        raise RecipeError(source, [("", "is a directory, not a recipe file")]) from None
    except OSError as err:
        raise RecipeError(source, [("", f"cannot read the file: {err.strerror or err}")]) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(source, [("", _too_large(None))])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RecipeError(
            source,
            [("", f"not UTF-8 text: byte 0x{data[err.start]:02x} at line {line} (save the file as UTF-8)")],
        ) from None


def _too_large(size: int | None) -> str:
    found = f"{size:,} bytes; " if size is not None else ""
    return f"too large for a recipe ({found}at most {MAX_RECIPE_BYTES:,} bytes): is this the right file?"


def _parse(source: str, text: str) -> Any:
    nested_too_deeply = RecipeError(source, [("", "not valid YAML: nested too deeply")])
    try:
        try:
            return yaml.load(text, Loader=_FAST_LOADER)
        except yaml.YAMLError as err:
            if "nesting depth" in str(err):
                raise nested_too_deeply from None
            # The pure-Python parser says where the error is more precisely (a caret under the column).
            return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(source, [("", f"not valid YAML: {err}")]) from None
    except RecursionError:
        raise nested_too_deeply from None


def _expanded_size(node: Any, seen: dict[int, int]) -> int:
    """Values in `node` counting each alias as a copy; memoised, so it costs one pass over the file."""
    if id(node) in seen:
        return seen[id(node)]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    size = 1 + sum(_expanded_size(child, seen) for child in children)
    seen[id(node)] = size
    return size


def apply_overrides(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...], schema: Any = None
) -> list[tuple[str, str]]:
    """Set `key.path=value` overrides in `raw`, in place; the problems found, with their keys.

    `eval.perplexity.0.seq_len` indexes lists (indices 0 to length - 1). Values are YAML-parsed, except
    that fields `schema` (a pydantic model) declares as strings keep the text as given.
    """
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((item, "an override must look like key.path=value"))
            continue
        parts = key.split(".")
        try:
            _set(raw, parts, text if _is_string_field(schema, parts) else _value(text))
        except _OverrideError as err:
            problems.append((key, str(err)))
    return problems


class _OverrideError(ValueError):
    pass


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise _OverrideError(
            f"the value {text!r} is not valid YAML ({reason}); quote it to pass text"
        ) from None
    except RecursionError:
        raise _OverrideError(f"the value {text[:40]!r}... is nested too deeply") from None


def _set(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "<root>"
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = _index(node, part, where)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # an absent or empty section (`train:`) becomes a mapping
                    node[part] = {}
                node = node[part]
        else:
            raise _OverrideError(f"cannot set this key: {where} is a value ({node!r}), not a section")


def _index(items: list[Any], part: str, where: str) -> int:
    valid = f"0 to {len(items) - 1}" if items else "none: the list is empty"
    if not (part.isascii() and part.isdigit()):
        raise _OverrideError(f"{part!r} is not a list index: {where} is a list (indices: {valid})")
    if int(part) >= len(items):
        raise _OverrideError(
            f"index {part} is out of range: {where} has {len(items)} item(s) (indices: {valid})"
        )
    return int(part)


def _is_string_field(schema: Any, parts: list[str]) -> bool:
    model = schema
    for part in parts:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return model is str or model == (str | None)


def validation_problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(key path, message) for every error pydantic found, paths starting with `prefix`."""
    return [(prefix + _path(e["loc"]), _message(e)) for e in err.errors()]


def _path(loc: tuple[Any, ...]) -> str:
    # pydantic adds the union member it tried ('str', 'list[str]'); users only care about their keys.
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "int"})))


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return error["msg"].removeprefix("Value error, ")
