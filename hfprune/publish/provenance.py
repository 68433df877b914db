"""Where a model card says a model came from, in words a stranger can follow on the Hub.

Used by `hfprune.publish.cards` when it renders a card and writes the `recipe.yaml` shipped beside it. A card is
read after the model was pulled, far from the machine that made it, so nothing here ever shows a local
path: the parent is its Hub id (`parent.hub_id` when it was loaded from a folder or a GGUF file), or "a
local checkpoint" with its folder's name; datasets are Hub ids with links, or local files by file name;
the shipped recipe has the same substitutions (and no `output_dir`), with a note on what to point at
your own copy before `hfprune run recipe.yaml`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from hfprune.publish.results import is_hub_dataset
from hfprune.recipe.schema import Recipe


HUB_URL = "https://huggingface.co"


def parent_reference(recipe: Recipe) -> tuple[str, str | None]:
    """(display name, Hub id or None) of the parent; a local directory has no Hub id unless `hub_id` says."""
    parent = recipe.parent
    if parent.hub_id:
        return parent.hub_id, parent.hub_id
    local = Path(parent.model).expanduser().exists() or parent.model.startswith((".", "/", "~"))
    return (Path(parent.model).name or parent.model, None) if local else (parent.model, parent.model)


def parent_context(recipe: Recipe) -> dict[str, Any]:
    """The parent as the templates show it: `ref` is a Markdown link, or "a local checkpoint (`name`)"."""
    name, hub_id = parent_reference(recipe)
    link = f"{HUB_URL}/{hub_id}" if hub_id else None
    return {
        "name": name,
        "link": link,
        "ref": f"[{name}]({link})" if link else f"a local checkpoint (`{name}`)",
        "local": hub_id is None,
        "gguf_file": recipe.parent.gguf_file,
    }


def dataset_reference(dataset: dict[str, Any]) -> str:
    """A dataset in words: a linked Hub id, the built-in pydoc corpus, or local files by file name."""
    path, split = dataset.get("path", "?"), dataset.get("split")
    on_split = f", split {split}" if split else ""
    if path.startswith("hfprune:"):
        what = (
            "the Python standard library's source"
            if path == "hfprune:python_stdlib"
            else "the Python documentation"
        )
        return f"`{path}` ({what} shipped with every interpreter{on_split})"
    if is_hub_dataset(path):
        details = ", ".join(
            d
            for d in (
                f"config {dataset.get('name')}" if dataset.get("name") else "",
                split and f"split {split}",
            )
            if d
        )
        return f"[{path}]({HUB_URL}/datasets/{path})" + (f" ({details})" if details else "")
    files = dataset.get("data_files") or path
    names = [Path(f).name for f in ([files] if isinstance(files, str) else list(files))]
    kind = path if path != files else "data"
    return f"local {kind} files {', '.join(f'`{n}`' for n in names)}" + (f" (split {split})" if split else "")


def _shareable_dataset(dataset: dict[str, Any]) -> dict[str, Any]:
    files = dataset.get("data_files")
    if isinstance(files, str):
        files = Path(files).name
    elif files:
        files = [Path(f).name for f in files]
    path = dataset.get("path", "")
    if not is_hub_dataset(path) and not path.startswith("hfprune:") and "/" in path:
        path = Path(path).name
    return {**dataset, "path": path, "data_files": files}


def shareable_recipe(recipe: Recipe) -> str:
    """The resolved recipe as shipped in a model folder: Hub ids for the parent, file names for local
    data, no output folder; a leading comment says what to replace before rerunning it."""
    data = recipe.model_dump(mode="json")
    parent = parent_context(recipe)
    data["output_dir"] = None
    data["parent"]["model"] = recipe.parent.hub_id or parent["name"]
    notes = []
    if parent["local"]:
        notes.append(f"parent.model was a local checkpoint named {parent['name']!r}: point it at your copy")
    elif recipe.parent.gguf_file and recipe.parent.model != recipe.parent.hub_id:
        notes.append(
            f"parent.gguf_file {recipe.parent.gguf_file!r} was read from a local folder, not from "
            f"{recipe.parent.hub_id}: point parent.model at the folder that holds it"
        )
    for section in ("calibration", "train"):
        if data.get(section) and data[section].get("dataset"):
            data[section]["dataset"] = _shareable_dataset(data[section]["dataset"])
    for entry in data.get("eval", {}).get("perplexity", []):
        entry["dataset"] = _shareable_dataset(entry["dataset"])
    local = _local_files(data)
    if local:
        notes.append(f"local data files ({', '.join(sorted(set(local)))}): point data_files at your copies")
    header = "".join(f"# {note}\n" for note in notes)
    return header + yaml.safe_dump(data, sort_keys=False)


def _local_files(data: dict[str, Any]) -> list[str]:
    datasets = [data.get(s, {}).get("dataset") for s in ("calibration", "train") if data.get(s)]
    datasets += [e["dataset"] for e in data.get("eval", {}).get("perplexity", [])]
    files: list[str] = []
    for dataset in filter(None, datasets):
        value = dataset.get("data_files")
        files += [value] if isinstance(value, str) else list(value or [])
    return files


def shareable_command(command: str) -> str:
    """The command that made the run, with directories dropped from paths (they were the maker's)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    return shlex.join(
        Path(w).name if "/" in w and not w.startswith("-") and "=" not in w else w for w in words
    )
