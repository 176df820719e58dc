"""State dicts: read one from a weights file without pickle, and load it into a module only when it fits.

One rule for every loader (pretrained backbone files, checkpoints, the authors' release): a state dict must have
exactly the module's keys with exactly its shapes; otherwise a :class:`~offset_cir.errors.CheckpointError` names
the missing, unexpected and mis-shaped keys (the first eight of each) and nothing is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from offset_cir.errors import CheckpointError, UserInputError

__all__ = ["load_weights_file", "compare_state", "load_state_strict"]

_SHOWN = 8  # keys named per kind of difference


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled modules and other objects are refused
        raise CheckpointError(
            f"{path}: cannot be read as a plain state dict with weights_only=True ({type(exc).__name__}: {exc}). "
            "Save a state dict (model.state_dict()) or a .safetensors file instead of a pickled module."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (" ..." if len(keys) > _SHOWN else "")


def compare_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str, note: str = "",
                  what: str = "checkpoint does not match this model's architecture") -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys, if any.

    The message starts ``"<source>: <what> (<note>)"``; ``note`` says why they may differ (e.g. which settings
    of the two configs differ)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source}: {what}" + (f" ({note})" if note else "")]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + _listed(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + _listed(unexpected))
    if wrong:
        lines.append(f"  shapes differ for {len(wrong)} keys:")
    for k in wrong[:_SHOWN]:
        lines.append(f"  shape of {k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}")
    raise CheckpointError("\n".join(lines))


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, note: str = "",
                      what: str = "checkpoint does not match this model's architecture") -> None:
    """``module.load_state_dict(state)`` after :func:`compare_state`: all keys and shapes must match."""
    compare_state(module.state_dict(), state, source, note, what)
    module.load_state_dict(state)
