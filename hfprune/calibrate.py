"""Layer-by-layer calibration: feed calibration tokens through the decoder one layer at a time.

Sits between data loading and scoring. The inputs of the first decoder layer are captured once
(the forward pass is cut short there), then `walk_layers` visits each layer with its inputs; what
the layer outputs becomes the next layer's inputs. Only one layer's activations for the calibration
set are alive at any time, so memory does not grow with depth, and a pruner may change a layer
between two `forward()` calls (sequential sparse pruning) so that later layers see pruned outputs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from hfprune.modeling import decoder_layers, module_device


logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the first layer's inputs are captured."""


@dataclass
class LayerStep:
    """One decoder layer and its calibration inputs (one tensor per batch)."""

    index: int
    layer: nn.Module
    inputs: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)

    @torch.no_grad()
    def forward(self) -> list[torch.Tensor]:
        """Run the layer (hooks included) on every batch; the result feeds the next layer.

        Activations are stored where the inputs are stored (host memory, see
        `capture_first_layer_inputs`) and moved to the layer's device one batch at a time.
        """
        device = module_device(self.layer)
        self.outputs = [
            _hidden(self.layer(hidden.to(device), **kwargs)).to(hidden.device)
            for hidden, kwargs in zip(self.inputs, self.layer_kwargs, strict=True)
        ]
        return self.outputs


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_first_layer_inputs(
    model: PreTrainedModel, input_ids: torch.Tensor, batch_size: int = 1
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states and keyword arguments (position embeddings, mask) entering decoder layer 0."""
    layers = decoder_layers(model)
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in {"cache", "past_key_values", "use_cache"}}
        # A whole calibration set of hidden states (1024 x 8192 x 4096 in bf16 is 64 GiB for
        # Llama-3.1-8B) does not fit beside the model on an accelerator; host memory holds it.
        captured.append((hidden.to("cpu"), kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = module_device(model)
    try:
        for batch in input_ids.split(batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return [h for h, _ in captured], [k for _, k in captured]


def walk_layers(
    model: PreTrainedModel, input_ids: torch.Tensor, batch_size: int = 1, desc: str = "calibration"
) -> Iterator[LayerStep]:
    """Yield a `LayerStep` per decoder layer, in order, with a progress bar.

    The caller may register hooks, call `step.forward()`, change the layer and call it again; the
    last outputs computed (or a fresh forward if the caller made none) feed the next layer.
    """
    was_training = model.training
    model.eval()
    try:
        hidden, kwargs = capture_first_layer_inputs(model, input_ids, batch_size)
        layers = decoder_layers(model)
        for index in tqdm(range(len(layers)), desc=desc, unit="layer", leave=False):
            step = LayerStep(index, layers[index], hidden, kwargs)
            yield step
            hidden = step.outputs if step.outputs is not None else step.forward()
            del step
    finally:
        model.train(was_training)
