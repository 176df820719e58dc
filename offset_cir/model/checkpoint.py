"""Model checkpoints: ``model.safetensors`` + ``config.json`` in one folder (no pickle anywhere).

``load_checkpoint`` rebuilds the model from the saved config; ``load_weights`` loads weights into an existing
model and, for a checkpoint of another architecture, says which keys or shapes differ.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from offset_cir import io
from offset_cir.config_base import ConfigError
from offset_cir.errors import CheckpointError, OfflineError
from offset_cir.hashing import file_sha256
from offset_cir.hub import hub_reachable
from offset_cir.model.config import ModelConfig
from offset_cir.model.weights import compare_state, load_state_strict  # noqa: F401  (compare_state: public here too)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "offset-cir/1"
log = logging.getLogger(__name__)


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` atomically; returns the folder."""
    from safetensors.torch import save

    import offset_cir

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    io.write_bytes(folder / WEIGHTS_NAME, save(state_tensors(model), metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "offset_cir_version": offset_cir.__version__, "model": model.config.to_dict()}
    if extra:
        meta.update(extra)
    io.write_text(folder / CONFIG_NAME, json.dumps(meta, indent=2))
    return folder


HUB_PREFIX = "hf-hub:"
_HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, "README.md", "results/*.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_checkpoint(path) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def _hub_cache_dir() -> str | None:
    """The Hugging Face cache folder as the environment says *now* (huggingface_hub reads it once, at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def resolve_hub_checkpoint(spec: str) -> Path:
    """``hf-hub:ORG/NAME[@REVISION]`` -> the local snapshot folder: the cache first, the hub only when it can be
    reached; offline and not cached fails at once with an :class:`OfflineError` saying what to do."""
    repo, _, revision = spec[len(HUB_PREFIX):].partition("@")
    if not _REPO_ID.match(repo):
        raise CheckpointError(f"{spec}: expected hf-hub:ORG/NAME (optionally @REVISION), e.g. hf-hub:my-org/offset-cirr")
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a dependency of open_clip
        raise CheckpointError(f"{spec}: huggingface_hub is not installed ({exc})") from exc
    kwargs = dict(repo_id=repo, revision=revision or None, cache_dir=_hub_cache_dir(), allow_patterns=_HUB_FILES)
    try:
        folder = huggingface_hub.snapshot_download(local_files_only=True, **kwargs)
    except LocalEntryNotFoundError:
        if not hub_reachable():
            raise OfflineError(
                f"{spec}: not in the Hugging Face cache ({_hub_cache_dir() or 'the default cache'}) and the hub is "
                "not reachable (HF_HUB_OFFLINE is set or there is no network). Download the folder elsewhere "
                f"(`huggingface-cli download {repo}`) and copy the cache, or pass the checkpoint folder itself."
            ) from None
        log.info("downloading %s from the Hugging Face hub", spec)
        try:
            folder = huggingface_hub.snapshot_download(**kwargs)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise CheckpointError(f"{spec}: cannot be fetched from the Hugging Face hub "
                                  f"({type(exc).__name__}: {str(exc)[:200]})") from None
    log.debug("%s resolved to %s", spec, folder)
    return Path(folder)


def _run_folder_hint(folder: Path) -> str:
    """For a folder holding checkpoints in sub-folders (a training run): which ones to pass instead."""
    found = [c for c in ("best", "last") if (folder / c / WEIGHTS_NAME).is_file()]
    found += sorted(c.name for c in folder.iterdir() if c.is_dir() and c.name not in found
                    and (c / WEIGHTS_NAME).is_file())[:5]
    if not found:
        return ""
    what = {"best": "best validation score", "last": "latest step"}
    named = " or ".join(f"{folder / c}" + (f" ({what[c]})" if c in what else "") for c in found)
    kind = "a training run folder" if (folder / "config.yaml").is_file() or "last" in found else "a folder of checkpoints"
    return f"; it is {kind}: pass one of its checkpoints, {named}"


def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, config file) of a checkpoint folder, its weights file, or ``hf-hub:ORG/NAME``."""
    p = resolve_hub_checkpoint(path) if is_hub_checkpoint(path) else Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    folder = p if p.is_dir() else p.parent
    weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if p.is_file() and p.suffix == ".safetensors":
        weights = p
    if not weights.is_file():
        hint = _run_folder_hint(folder) if p.is_dir() else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} found (expected a folder written by save_checkpoint){hint}")
    if not config.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} beside the weights (expected a folder written by save_checkpoint)")
    return weights, config


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The folder holding a checkpoint's ``config.json`` (resolving ``hf-hub:`` names); CheckpointError if none."""
    return _resolve(path)[1].parent


def read_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    _, config = _resolve(path)
    try:
        meta = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config}: not a valid offset-cir checkpoint config ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{config}: not a valid offset-cir checkpoint config (expected a JSON object with "
                              "a \"model\" object holding the model's settings)")
    if meta["model"].get("focus_channels", 0) is None:
        # None means "read P from the weights", which only convert_release_checkpoint does
        raise CheckpointError(f"{config}: field \"focus_channels\" is null; a saved checkpoint records its P "
                              "(an integer, e.g. 8)")
    try:  # older field names (LEGACY_NAMES) read as the current ones; every field's type checked
        return ModelConfig.from_dict(meta["model"], source=str(config), key="model")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def config_differences(saved: ModelConfig, wanted: ModelConfig) -> str:
    a, b = saved.to_dict(), wanted.to_dict()
    diffs = [f"{k}: checkpoint {a[k]!r}, requested {b[k]!r}" for k in a if a[k] != b[k] and k != "pretrained"]
    return "; ".join(diffs)


def load_weights(model, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights into ``model`` (strict; a clear error for another architecture)."""
    from safetensors.torch import load_file

    weights, _ = _resolve(path)
    state = load_file(str(weights))
    try:
        note = config_differences(read_checkpoint_config(path), model.config)
    except CheckpointError:
        note = ""
    load_state_strict(model, state, str(path), note)


def load_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None, map_location: str = "cpu"):
    """Rebuild the model saved at ``path`` (a checkpoint folder, its ``model.safetensors``, or
    ``hf-hub:ORG/NAME[@REVISION]`` from the Hugging Face hub, cache first). With ``config``, build that
    architecture and check it fits."""
    from offset_cir.model.offset import OFFSET

    if is_hub_checkpoint(path):
        path = resolve_hub_checkpoint(path)
    saved = read_checkpoint_config(path)
    cfg = config or saved
    # The weights are in the checkpoint: never fetch the backbone's pretrained weights again.
    model = OFFSET(cfg, load_weights=False)
    load_weights(model, path)
    return model.to(map_location)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 of the weights file (identifies the model an index or result came from)."""
    weights, _ = _resolve(path)
    return file_sha256(weights)


def require_same_checkpoint(found: str | None, recorded: str | None, *, found_in: str, recorded_in: str,
                            why: str = "its features would not match this model's queries") -> None:
    """Refuse to put together what two different models made (features, an export, queries).

    ``found`` is the identity of what is about to be used (``sha256:<hex>`` of a checkpoint, or the ``state:<hex>``
    of an in-memory model), ``recorded`` the one written beside the features or in the export; ``found_in`` and
    ``recorded_in`` name them for the message (``"checkpoint runs/x"``, ``"index pictures.idx"``). When either is
    None there is nothing to compare. The :class:`CheckpointError` names both identities and says ``why``."""
    if found is None or recorded is None or found == recorded:
        return
    raise CheckpointError(f"{found_in} hashes to {_short_identity(found)}, but {recorded_in} was built with "
                          f"{_short_identity(recorded)}: {why}")


_FULL_DIGEST = re.compile(r"([0-9a-f]{12})[0-9a-f]{52}")


def _short_identity(identity: str) -> str:
    """An identity for a message: each SHA-256 digest in it cut to 12 hex digits (``sha256:0123456789ab…``; a
    baseline's ``baseline-target:NAME:sha256:0123456789ab…:seed0``); one without a digest whole up to 80
    characters (a baseline of tagged weights: ``baseline-target:ViT-B-16:openai:seed0``)."""
    text = _FULL_DIGEST.sub(lambda m: m.group(1) + "…", str(identity))
    return text if len(text) <= 80 else f"{text[:79]}…"
