"""A sparse parent's masks, kept through pruning and training instead of lost in silence.

A published sparse model (a `models/continued` or `models/pruned` folder of an earlier run, or any model
with a `sparsity_masks.safetensors` in the format of `hfprune.masks.storage` beside its weights) carries its zero
pattern in that file; training the model without it fills the zeros in. So `hfprune.hub.load_parent`
reads the file with the parent (`load_parent_masks`, which also zeroes any weight the masks remove), and
the prune stage carries the masks over to the pruned model (`carry_parent_masks`) before it saves them to
`models/pruned/sparsity_masks.safetensors`, from where training and the twin read them like any sparse
pruner's masks:

- depth pruning keeps the masks of the kept layers, renumbered as the layers are (the layer path comes
  from the architecture registry);
- width pruning keeps, for each masked weight, the zeros of its sliced copy: width pruners only select
  rows and columns (they add biases, never change a kept weight), so those zeros are exactly the sliced
  mask;
- sparse pruning combines both: a weight the parent removed stays removed (the keeps are ANDed). The
  parent's zeros score zero under every sparse criterion, so they are the first weights a pruner removes
  and count toward its target; only where the parent is sparser than the target does the result exceed it,
  and the prune report and the log say so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel

from hfprune.errors import RunFailure
from hfprune.masks.storage import load_masks, masks_from_zeros
from hfprune.pruners.base import PruneResult
from hfprune.pruners.options import Granularity


logger = logging.getLogger(__name__)

MASKS_FILE = "sparsity_masks.safetensors"


class ParentMasksError(RunFailure, ValueError):
    """The parent's mask file cannot be read or does not fit its weights."""


def find_parent_masks(spec: Any) -> Path | None:
    """The parent's mask file: beside a local parent's weights, or in its Hub repo; None when it has none."""
    path = Path(spec.model).expanduser()
    if path.is_dir():
        found = path / MASKS_FILE
        return found if found.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(spec.model, MASKS_FILE, revision=spec.revision))
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        # Offline and not in the cache: the weights loaded from the cache, so the file most likely does
        # not exist; say so in case it does.
        logger.info("parent %s: no %s in the local cache (offline), taken as dense", spec.model, MASKS_FILE)
        return None
    except (HfHubHTTPError, OSError) as err:  # not knowing would risk losing a sparse parent's zeros
        raise ParentMasksError(
            f"cannot check the Hub for the parent's {MASKS_FILE} in {spec.model!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else err!r}); check the network (HF_ENDPOINT) and rerun"
        ) from None


def load_parent_masks(spec: Any, model: PreTrainedModel) -> dict[str, torch.Tensor] | None:
    """The parent's keep-masks (None for a dense parent), with the weights they remove set to zero."""
    path = find_parent_masks(spec)
    if path is None:
        return None
    try:
        masks = load_masks(path)
    except (ValueError, KeyError, OSError, SafetensorError) as err:  # not a mask file, or a damaged one
        raise ParentMasksError(
            f"cannot read the parent's masks {path}: {err}; restore the file from where the parent was "
            "published, or remove it to prune the parent as a dense model"
        ) from None
    params = dict(model.named_parameters())
    bad = [n for n, m in masks.items() if n not in params or tuple(params[n].shape) != tuple(m.shape)]
    if bad:
        raise ParentMasksError(
            f"the parent's masks {path} do not fit its weights ({len(bad)} unknown or of another shape, e.g. "
            f"{bad[0]!r}); use the mask file published with these weights, or remove it"
        )
    stray = apply_masks(model, masks)
    removed = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    if stray:
        logger.warning("parent %s: %d weights under its masks were not zero; set to zero", spec.model, stray)
    logger.info(
        "parent %s is sparse: %d of %d weights of %d matrices removed by %s; kept through pruning and training",
        spec.model, removed, total, len(masks), path.name,
    )  # fmt: skip
    return masks


@torch.no_grad()
def apply_masks(model: PreTrainedModel, masks: Mapping[str, torch.Tensor]) -> int:
    """Zero the weights `masks` remove; returns how many of them were not zero already."""
    params = dict(model.named_parameters())
    stray = 0
    for name, keep in masks.items():
        param = params[name]
        removed = ~keep.to(param.device)
        stray += int(param[removed].count_nonzero())
        param.masked_fill_(removed, 0)
    return stray


def carry_parent_masks(
    masks: Mapping[str, torch.Tensor] | None, result: PruneResult, granularity: Granularity, layers_path: str
) -> None:
    """Give `result` the parent's masks as they apply to the pruned model (see the module note).

    `layers_path` is the architecture's path to the decoder layers (`model.layers` for Llama). The pruned
    model's weights are zeroed where the carried masks remove them, and `result.details["parent_masks"]`
    records what was carried.
    """
    if not masks:
        return
    if granularity is Granularity.DEPTH:
        carried = _renumbered(masks, result.details["kept_layers"], layers_path)
        how = "masks of the kept layers, renumbered"
    elif granularity is Granularity.WIDTH:
        params = dict(result.model.named_parameters())
        carried = masks_from_zeros(result.model, [name for name in masks if name in params])
        how = "masks sliced with the kept channels (the zeros of each kept weight)"
    else:
        carried = _combined(masks, result.masks or {})
        how = "combined with the pruner's (a weight the parent removed stays removed)"
    apply_masks(result.model, carried)
    result.masks = {**(result.masks or {}), **carried}
    parent_zeros = sum(int((~m).sum()) for m in masks.values())
    result.details["parent_masks"] = {
        "file": MASKS_FILE,
        "matrices": len(masks),
        "parent_removed": parent_zeros,
        "removed_after": sum(int((~m).sum()) for m in carried.values()),
        "carried": how,
    }
    logger.info("parent's masks carried to the pruned model: %s", how)


def _renumbered(
    masks: Mapping[str, torch.Tensor], kept: list[int], layers_path: str
) -> dict[str, torch.Tensor]:
    """The masks of the kept layers under their new indices; masks outside the layers unchanged."""
    new_index = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.(.+)$")
    carried = {}
    for name, keep in masks.items():
        found = pattern.match(name)
        if found is None:
            carried[name] = keep
        elif int(found.group(1)) in new_index:
            carried[f"{layers_path}.{new_index[int(found.group(1))]}.{found.group(2)}"] = keep
    return carried


def _combined(
    parent: Mapping[str, torch.Tensor], pruned: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per weight, kept only if both the parent and the pruner keep it; says when that exceeds the target."""
    combined, extra = {}, 0
    for name, keep in parent.items():
        mine = pruned.get(name)
        combined[name] = keep if mine is None else keep & mine
        if mine is not None:
            extra += int((mine & ~keep).sum())
    if extra:
        logger.warning(
            "the parent's masks remove %d weights the pruner kept (the parent is sparser than prune.ratio "
            "there): they stay removed, so the pruned model is sparser than requested",
            extra,
        )
    return {**pruned, **combined}
