"""The network seam: every byte hfprune reads from or writes to the Hub passes through here.

`load_parent` turns a `parent` spec (Hub repo id or local directory, optionally a GGUF file inside
it) into an ordinary float `LlamaForCausalLM` and its tokenizer, with a sparse parent's masks
(`hfprune.masks.parent`). Weights load from safetensors only;
remote code runs only when the recipe asks for it.

`push_folder` publishes one model folder (the last stage, and `hfprune push`): create the repo if
missing, upload as one commit, retry with backoff. Tokens come from the environment or the
`hf auth login` cache through huggingface_hub itself; nothing here stores, logs or formats them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from hfprune import kinds
from hfprune.architectures.registry import check_supported
from hfprune.errors import RunFailure
from hfprune.models.config_cache import cached_config
from hfprune.models.placement import place, resolve_device
from hfprune.training.pretrain import planned_parent_config


logger = logging.getLogger(__name__)


class ParentLoadError(RunFailure, RuntimeError):
    """The parent could not be found or fetched; the message says what was tried and what to do."""


@dataclass(frozen=True)
class Parent:
    model: PreTrainedModel
    tokenizer: Any
    masks: dict[str, torch.Tensor] | None = None  # a sparse parent's keep-masks (`hfprune.masks.parent`)


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
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ParentLoadError(
            f"parent.model: {spec.model!r} needs its own modeling code (its config.json has an auto_map "
            "and a model_type transformers does not know); hfprune prunes Llama-family models that load "
            "without it: use such a parent, or set parent.trust_remote_code: true if you trust that code"
        ) from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise ParentLoadError(
            f"cannot read the parent {what} in {spec.model!r}: a safetensors file is truncated or corrupt "
            f"({err}); download or save the parent again"
        ) from None


def load_parent_config(spec: Any) -> PretrainedConfig:
    """The parent's config only (no weights), for plans and dry runs: planned until a parent pretrained
    here is made, else read once per process while its files are unchanged (`hfprune.models.config_cache`)."""
    read = lambda: _load("config", spec, AutoConfig.from_pretrained)  # noqa: E731
    return planned_parent_config(spec) or cached_config(spec, read, check_supported)


def load_parent(spec: Any) -> Parent:
    """Load the parent model and tokenizer described by a recipe's `parent` section, placed on
    `parent.device` (`hfprune.models.placement`: the accelerator when there is one)."""
    device = resolve_device(getattr(spec, "device", "auto"))  # a device this machine lacks fails first
    config = load_parent_config(spec)
    dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
    tokenizer = _load("tokenizer", spec, AutoTokenizer.from_pretrained)
    extra = {} if spec.gguf_file else {"use_safetensors": True}
    model = _load("weights", spec, AutoModelForCausalLM.from_pretrained, config=config, dtype=dtype, **extra)
    if spec.gguf_file:
        model = _plain_copy(model)
    model.eval()
    place(model, device, stage=f"parent {spec.model}")
    logger.info("loaded parent %s (%s layers)", spec.model, model.config.num_hidden_layers)
    from hfprune.masks.parent import load_parent_masks  # its pruner types import this module

    return Parent(model=model, tokenizer=tokenizer, masks=load_parent_masks(spec, model))


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


# -- publishing -------------------------------------------------------------------------------------
# Answers worth retrying: timeouts, conflicts with a concurrent commit (412), rate limits, server errors.
RETRY_STATUSES = {408, 409, 412, 425, 429, 500, 502, 503, 504}
RETRY_BACKOFF_SECONDS = 2.0


class PushError(RunFailure, RuntimeError):
    """Publishing failed; the local outputs are untouched and the message says how to retry."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit: str
    commit_url: str
    new_commit: bool  # False when the repo already held exactly these files

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def repo_id_for(prefix: str, kind: str) -> str:
    """The repo of one model of a run: `push.repo_prefix` plus the kind's suffix (see `hfprune.kinds`)."""
    return f"{prefix}{kinds.get(kind).repo_suffix}"


def published_kinds(include_pruned: bool, available: list[str]) -> list[str]:
    """The models of a run that get a repo: the kinds published by default, then (with `include_pruned`)
    the others. Without any of the first, the one-shot pruned model is the only result, so it is
    published whatever `include_pruned` says."""
    candidates = [kind for kind in kinds.all_kinds() if kind.publishable and kind.name in available]
    default = [kind.name for kind in candidates if kind.published_by_default]
    optional = [kind.name for kind in candidates if not kind.published_by_default]
    return default + (optional if include_pruned or not default else [])


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool,
    commit_message: str,
    commit_description: str = "",
    retries: int = 3,
    retry_hint: str = "run the push again",
) -> PushResult:
    """Create `repo_id` if missing and upload `folder` as one commit; unchanged files make no commit.

    huggingface_hub's folder upload retries a failed commit POST itself; after an answer lost on its
    way back, such a retry would commit the same files twice, unless the commit is pinned to the head
    it was built on. So every attempt pins `parent_commit` to the head it read: a commit that landed
    makes the retry fail (412) instead, and the next attempt here re-reads the head, finds the files
    already there and commits nothing. Attempts are repeated with exponential backoff.
    """
    from huggingface_hub import HfApi, constants, get_token

    if not get_token():
        raise PushError(
            f"no Hugging Face token for {repo_id}: set HF_TOKEN or run `hf auth login`, then {retry_hint}"
        )
    api = HfApi()
    heads: list[str] = []  # the branch head each attempt started from
    for attempt in range(retries + 1):
        try:
            return _push_once(api, folder, repo_id, private, commit_message, commit_description, heads)
        except Exception as err:  # classified by _failure; anything that is not a Hub failure re-raises
            reason = _failure(err, constants.ENDPOINT)
            if reason is None:
                raise
            fatal, text = reason
            if fatal or attempt == retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise PushError(
                    f"pushing {folder} to {repo_id} failed{tries}: {text}; the local outputs are intact, {retry_hint}"
                ) from None
            wait = RETRY_BACKOFF_SECONDS * 2**attempt
            logger.warning(
                "push to %s failed (%s); retry %d of %d in %.0f s", repo_id, text, attempt + 1, retries, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _push_once(
    api: Any, folder: Path, repo_id: str, private: bool, message: str, description: str, heads: list[str]
) -> PushResult:
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.model_info(repo_id)
    heads.append(info.sha)
    if info.private != private:
        logger.warning(
            "%s exists and is %s; its visibility is left as it is", repo_id, _visibility(info.private)
        )
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        commit_message=message,
        commit_description=description,
        parent_commit=info.sha,
    )
    # Measured against the first head seen: a commit of an earlier attempt whose answer was lost is new too.
    result = PushResult(repo_id, str(url), commit.oid, commit.commit_url, new_commit=commit.oid != heads[0])
    logger.info(
        "%s: %s", repo_id, commit.commit_url if result.new_commit else "already up to date, no new commit"
    )
    return result


def _failure(err: Exception, endpoint: str) -> tuple[bool, str] | None:
    """(fatal, what to tell the user) for a Hub failure, or None for an error that is not one."""
    import httpx2  # huggingface_hub's HTTP client: raises its transport errors unwrapped

    if isinstance(err, OfflineModeIsEnabled):
        return True, "HF_HUB_OFFLINE is set, which forbids every Hub request: unset it to publish"
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return True, (
                f"the Hub at {endpoint} rejected the token (HTTP {status}): set HF_TOKEN to a token with write "
                "access to this namespace, or run `hf auth login`"
            )
        return status not in RETRY_STATUSES, f"HTTP {status} from {endpoint}: {str(err).splitlines()[0]}"
    if isinstance(err, httpx2.TransportError | ConnectionError | TimeoutError):
        return (
            False,
            f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {err}); check HF_ENDPOINT and the network",
        )
    return None


def _visibility(private: bool | None) -> str:
    return "private" if private else "public"
