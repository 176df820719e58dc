"""Model checkpoints: ``model.safetensors`` + ``config.json`` in one folder (no pickle anywhere).

``load_checkpoint`` rebuilds the model from the saved config; ``load_weights`` loads weights into an existing
model and, for a checkpoint of another architecture, says which keys or shapes differ.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from offset_cir.errors import CheckpointError
from offset_cir.model.config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "offset-cir/1"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` atomically; returns the folder."""
    from safetensors.torch import save

    import offset_cir

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(folder / WEIGHTS_NAME, save(state_tensors(model), metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "offset_cir_version": offset_cir.__version__, "model": model.config.to_dict()}
    if extra:
        meta.update(extra)
    _atomic_write_bytes(folder / CONFIG_NAME, json.dumps(meta, indent=2).encode())
    return folder


def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if p.is_file() and p.suffix == ".safetensors":
        weights = p
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} found (expected a folder written by save_checkpoint)")
    if not config.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} beside the weights (expected a folder written by save_checkpoint)")
    return weights, config


def read_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    _, config = _resolve(path)
    try:
        meta = json.loads(config.read_text())
        return ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config}: not a valid offset-cir checkpoint config ({exc})") from exc


def compare_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str, note: str = "") -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source}: checkpoint does not match this model's architecture" + (f" ({note})" if note else "")]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        lines.append(f"  shapes differ for {len(wrong)} keys:")
    for k in wrong[:8]:
        lines.append(f"  shape of {k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}")
    raise CheckpointError("\n".join(lines))


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
    compare_state(model.state_dict(), state, str(path), note)
    model.load_state_dict(state)


def load_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None, map_location: str = "cpu"):
    """Rebuild the model saved at ``path``. With ``config``, build that architecture and check it fits."""
    import dataclasses

    from offset_cir.model.offset import OFFSET

    saved = read_checkpoint_config(path)
    cfg = config or saved
    # The weights are in the checkpoint: never fetch the backbone's pretrained weights again.
    model = OFFSET(dataclasses.replace(cfg, pretrained=None))
    model.config = dataclasses.replace(model.config, pretrained=cfg.pretrained)
    load_weights(model, path)
    return model.to(map_location)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 of the weights file (identifies the model an index or result came from)."""
    weights, _ = _resolve(path)
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
