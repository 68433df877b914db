"""Calibration passes: how calibration tokens flow through the parent, on the device it computes on.

Sits between data loading (`hfprune.data.texts.calibration_tokens`) and the pruners' scores. Two shapes:

- Streaming (`stream_forward`, `trace_decoder`): one forward per calibration batch, cut short after the
  last decoder layer. Pruners read activations from hooks and reduce them where they are computed
  (the model's device) into running sums, so memory is one batch's whatever the number of windows,
  and no activation crosses to the host. ShortGPT, Minitron (depth and width) and FLAP score this way.
- Sequential (`LayerWalk`): the sparse pruners' layer-by-layer walk, where a layer is pruned before
  the next one sees its outputs. It needs every window's hidden state at the current depth; an
  `ActivationStore` (`hfprune.pruners.activation_store`) holds them on the model's device within a byte budget
  and spills the rest to files, and the layer's own outputs replace its inputs batch by batch.

Layer arguments other than the hidden states (rotary cos/sin, masks) depend on a batch's shape only:
they are captured once per shape and per layer and shared by every window, never copied per window.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from hfprune.models.placement import onloaded
from hfprune.models.structure import decoder_layers
from hfprune.pruners.activation_store import ActivationStore


logger = logging.getLogger(__name__)

Kwargs = dict[str, Any]
_DROPPED = {"cache", "past_key_values", "past_key_value", "use_cache"}


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what the caller needs has been computed."""


def execution_device(model: PreTrainedModel) -> torch.device:
    """Where calibration batches go: the input embedding's device (also for offloaded decoder layers)."""
    return model.get_input_embeddings().weight.device


def batches(input_ids: torch.Tensor, batch_size: int, desc: str) -> Iterator[torch.Tensor]:
    """The calibration windows `batch_size` at a time, with a progress bar (one view alive at a time)."""
    starts = range(0, input_ids.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False):
        yield input_ids[start : start + batch_size]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for a calibration pass; the training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def layer_input(args: tuple, kwargs: Kwargs) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positionally or by name)."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: Kwargs) -> torch.Tensor:
    """Call one decoder layer as the model does (hooks included) and return its hidden states."""
    return layer_output(layer(hidden, **kwargs))


def _forward(model: PreTrainedModel, batch: torch.Tensor) -> None:
    with contextlib.suppress(_StopForward):
        model(input_ids=batch.to(execution_device(model)), use_cache=False)


def stream_forward(model: PreTrainedModel, input_ids: torch.Tensor, batch_size: int, desc: str) -> int:
    """Run every calibration batch through the decoder once, for the hooks the caller registered.

    The pass stops after the last decoder layer (the final norm and the LM head, whose logits would be
    the largest tensor of the pass, are never run). Returns the number of tokens fed.
    """
    last = decoder_layers(model)[-1]

    def stop(_module: nn.Module, _args: tuple, _output: Any) -> None:
        raise _StopForward

    handle = last.register_forward_hook(stop)  # registered last, so the caller's hooks on it run first
    try:
        with evaluating(model):
            for batch in batches(input_ids, batch_size, desc):
                _forward(model, batch)
    finally:
        handle.remove()
    return input_ids.numel()


@dataclass
class DecoderTrace:
    """One batch through the decoder: `hidden[i]` enters layer i, `hidden[-1]` leaves the last layer;
    `kwargs[i]` is what layer i was called with besides its hidden states."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[Kwargs] = field(default_factory=list)


def trace_decoder(model: PreTrainedModel, batch: torch.Tensor, keep_hidden: bool = True) -> DecoderTrace:
    """The hidden states entering every decoder layer (and leaving the last), and every layer's arguments.

    One forward pass, stopped after the last layer; all of it stays on the model's device. With
    `keep_hidden=False` only the first layer's input is kept (the arguments are all that is wanted).
    """
    layers, trace = decoder_layers(model), DecoderTrace()

    def enter(_module: nn.Module, args: tuple, kwargs: Kwargs) -> None:
        if keep_hidden or not trace.hidden:
            trace.hidden.append(layer_input(args, kwargs))
        trace.kwargs.append({k: v for k, v in kwargs.items() if k not in _DROPPED and k != "hidden_states"})

    def leave(_module: nn.Module, _args: tuple, output: Any) -> None:
        if keep_hidden:
            trace.hidden.append(layer_output(output))
        raise _StopForward

    handles = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(leave))
    try:
        with evaluating(model):
            _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return trace


def first_layer_input(model: PreTrainedModel, batch: torch.Tensor) -> tuple[torch.Tensor, Kwargs]:
    """The hidden states and arguments entering decoder layer 0 (the forward stops there)."""
    captured: list[tuple[torch.Tensor, Kwargs]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: Kwargs) -> None:
        rest = {k: v for k, v in kwargs.items() if k not in _DROPPED and k != "hidden_states"}
        captured.append((layer_input(args, kwargs), rest))
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with evaluating(model):
            _forward(model, batch)
    finally:
        handle.remove()
    return captured[0]


def same_arguments(a: Any, b: Any) -> bool:
    """Whether two layer-argument values are equal (tensors by value; nested tuples, lists and dicts)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and (a.is_meta or torch.equal(a, b.to(a.device)))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_arguments(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_arguments(a[k], b[k]) for k in a)
    return a is b or a == b


# -- the sequential walk ---------------------------------------------------------------------------
@dataclass(eq=False)
class LayerStep:
    """One decoder layer of the walk, with the calibration set's hidden states entering it.

    `forward()` runs the layer on every batch (the caller's hooks see its inputs); the caller may
    change the layer in between. When the caller is done, the walk runs the layer (as it then is) once
    more and its outputs replace the inputs: they feed the next layer.
    """

    index: int
    layer: nn.Module
    store: ActivationStore
    layer_kwargs: list[Kwargs]  # per batch; batches of one shape share the same objects
    _outputs: list[Any] | None = field(default=None, repr=False)

    def inputs(self) -> Iterator[torch.Tensor]:
        """This layer's input hidden states, one batch at a time."""
        for position in range(len(self.store)):
            yield self.store.get(position)

    @torch.no_grad()
    def forward(self) -> None:
        """Run the layer (hooks included) on every batch; the outputs are not kept."""
        for hidden, kwargs in zip(self.inputs(), self.layer_kwargs, strict=True):
            run_layer(self.layer, hidden, kwargs)

    @torch.no_grad()
    def advance(self) -> None:
        """Replace every batch's stored inputs by this layer's outputs (the next layer's inputs)."""
        self._outputs = [
            self.store.replace(position, run_layer(self.layer, hidden, kwargs))
            for position, (hidden, kwargs) in enumerate(zip(self.inputs(), self.layer_kwargs, strict=True))
        ]

    @property
    def outputs(self) -> list[torch.Tensor] | None:
        """The outputs the walk computed for this layer, loaded whole (small sets and tests only)."""
        return None if self._outputs is None else [self.store.load(entry) for entry in self._outputs]


class LayerWalk:
    """The sequential walk over a model's decoder layers, holding at most `max_activation_bytes`.

    Iterating yields one `LayerStep` per layer, in order; `report` says how the activations were held
    (the store's summary) and `advance_seconds` the time spent computing each layer's outputs.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        batch_size: int = 1,
        desc: str = "calibration",
        max_activation_bytes: int | None = None,
    ) -> None:
        self.model, self.input_ids, self.batch_size, self.desc = model, input_ids, batch_size, desc
        self.budget = max_activation_bytes
        self.report: dict[str, Any] = {}
        self.advance_seconds = 0.0

    def __iter__(self) -> Iterator[LayerStep]:
        with evaluating(self.model):
            store, per_layer = self._capture()
            layers = decoder_layers(self.model)
            for index in tqdm(range(len(layers)), desc=self.desc, unit="layer", leave=False):
                with onloaded(layers[index]):
                    step = LayerStep(index, layers[index], store, [kwargs[index] for kwargs in per_layer])
                    yield step
                    start = time.perf_counter()
                    step.advance()
                    if store.device.type == "cuda":
                        torch.cuda.synchronize(store.device)  # kernels are asynchronous: time them here
                    self.advance_seconds += time.perf_counter() - start
                del step  # a caller that keeps steps keeps their outputs; the walk itself does not

    def _capture(self) -> tuple[ActivationStore, list[list[Kwargs]]]:
        """Store every batch's input to layer 0; the layers' arguments once per batch shape."""
        store = ActivationStore(self.budget, execution_device(self.model), self.desc)
        by_shape: dict[tuple[int, ...], list[Kwargs]] = {}
        per_batch: list[list[Kwargs]] = []
        for batch in batches(self.input_ids, self.batch_size, f"{self.desc} (inputs)"):
            shape = tuple(batch.shape)
            if shape not in by_shape:
                trace = trace_decoder(self.model, batch, keep_hidden=False)
                by_shape[shape], hidden = trace.kwargs, trace.hidden[0]
            else:
                hidden, kwargs = first_layer_input(self.model, batch)
                if not same_arguments(kwargs, by_shape[shape][0]):
                    raise RuntimeError(
                        "calibration batches of the same shape gave decoder layer 0 different arguments; "
                        "the walk shares them per shape and cannot calibrate this model"
                    )
            store.append(hidden)
            per_batch.append(by_shape[shape])
        self.report = store.finish_capture()
        return store, per_batch
