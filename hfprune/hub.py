"""The network seam: every byte hfprune reads from (or later writes to) the Hub passes through here.

`load_parent` turns a `parent` spec (Hub repo id or local directory, optionally a GGUF file inside
it) into an ordinary float `LlamaForCausalLM` and its tokenizer. Tokens come from the environment or
the `hf auth login` cache through huggingface_hub itself and are never read or stored here. Weights
load from safetensors only; remote code runs only when the recipe asks for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from hfprune.modeling import check_supported


logger = logging.getLogger(__name__)


class ParentLoadError(RuntimeError):
    """The parent could not be found or fetched; the message says what was tried and what to do."""


@dataclass(frozen=True)
class Parent:
    model: PreTrainedModel
    tokenizer: Any


def _source_kwargs(spec: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return kwargs


def _check_reference(spec: Any) -> None:
    path = Path(spec.model).expanduser()
    looks_local = spec.model.startswith((".", "/", "~")) or spec.model.count("/") > 1
    if looks_local and not path.is_dir():
        raise ParentLoadError(f"parent.model: local directory {spec.model!r} does not exist")
    if spec.gguf_file and path.is_dir() and not (path / spec.gguf_file).is_file():
        raise ParentLoadError(f"parent.gguf_file: {spec.gguf_file!r} is not a file inside {spec.model!r}")


def _load(what: str, spec: Any, loader: Any, **extra: Any) -> Any:
    """Call a from_pretrained-style loader, turning Hub and file errors into `ParentLoadError`."""
    _check_reference(spec)
    try:
        return loader(str(Path(spec.model).expanduser()), **_source_kwargs(spec), **extra)
    except RepositoryNotFoundError:
        raise ParentLoadError(
            f"parent.model: {spec.model!r} is neither a local directory nor a Hub repo you can access "
            "(check the name, and HF_TOKEN or `hf auth login` for gated models)"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, ConnectionError) as err:
        raise ParentLoadError(
            f"cannot fetch the parent {what} for {spec.model!r} from the Hub ({type(err).__name__}): is the Hub "
            "reachable (HF_ENDPOINT) and, offline, is the model in the cache (HF_HOME)?"
        ) from None
    except OSError as err:
        raise ParentLoadError(f"cannot load the parent {what} from {spec.model!r}: {err}") from None


def load_parent_config(spec: Any) -> PretrainedConfig:
    """The parent's config only (no weights): enough for plans and dry runs."""
    config = _load("config", spec, AutoConfig.from_pretrained)
    check_supported(config)
    return config


def load_parent(spec: Any) -> Parent:
    """Load the parent model and tokenizer described by a recipe's `parent` section."""
    config = load_parent_config(spec)
    dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
    tokenizer = _load("tokenizer", spec, AutoTokenizer.from_pretrained)
    extra = {} if spec.gguf_file else {"use_safetensors": True}
    model = _load("weights", spec, AutoModelForCausalLM.from_pretrained, config=config, dtype=dtype, **extra)
    if spec.gguf_file:
        model = _plain_copy(model)
    model.eval()
    logger.info("loaded parent %s (%s layers)", spec.model, model.config.num_hidden_layers)
    return Parent(model=model, tokenizer=tokenizer)


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A GGUF-loaded model carries a quantization config that forbids saving; rebuild it as a plain one."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    return plain.to(next(model.parameters()).dtype)


def parent_license(spec: Any) -> str | None:
    """The parent's license from its model card or GGUF metadata, where one is recorded."""
    path = Path(spec.model).expanduser()
    if spec.gguf_file and path.is_dir():
        return _gguf_license(path / spec.gguf_file)
    try:
        from huggingface_hub import ModelCard

        card = ModelCard.load(str(path / "README.md") if path.is_dir() else spec.model)
        return card.data.to_dict().get("license")
    except Exception:  # noqa: BLE001  (a missing or unreadable card only means the license is unknown)
        return None


def _gguf_license(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.license")
    except Exception:  # noqa: BLE001  (unreadable metadata only means the license is unknown)
        return None
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
